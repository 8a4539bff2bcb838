"""Training state on disk: one `state.pt` per Ray Train checkpoint directory, loaded with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

STATE_FILE = "state.pt"


def save_state(directory: str | Path, state: dict) -> Path:
    """state: tensors, numbers, strings and dicts/lists of them only (so weights_only loading accepts it)."""
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {STATE_FILE}")
    return torch.load(path, map_location=map_location, weights_only=True)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one worker's training step. Deriving it from (seed, rank, step) makes a resumed run draw
    exactly the t, ε and dropout masks an uninterrupted run would have, with no RNG state to carry."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)
