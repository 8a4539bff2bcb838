"""Exponential moving average of model weights (DDPM uses decay 0.9999), with warm-up for short runs.

Warm-up follows TensorFlow's ExponentialMovingAverage(num_updates): decay_n = min(decay, (1 + n) / (10 + n)),
so early averages are not dominated by the random initialisation.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def decay_for_half_life(half_life_steps: float) -> float:
    """The per-step decay whose weight halves after `half_life_steps` updates: 0.5 ** (1 / h)."""
    if half_life_steps <= 0:
        raise ValueError(f"EMA half-life must be positive, got {half_life_steps}")
    return math.pow(0.5, 1.0 / half_life_steps)


class EMA:
    """Holds `averaged`, a frozen copy of the model whose parameters track the EMA; buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.averaged = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """averaged ← d · averaged + (1 − d) · model, for every parameter; buffers copied."""
        decay = self.current_decay()
        avg_params = list(self.averaged.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(avg_params, [p.to(a.dtype) for p, a in zip(params, avg_params)], 1.0 - decay)
        for avg_buf, buf in zip(self.averaged.buffers(), model.buffers()):
            avg_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        self.averaged.load_state_dict(state["averaged"])
