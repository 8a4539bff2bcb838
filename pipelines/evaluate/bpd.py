"""Held-out bits/dim: the full bound L_T + Σ L_{t−1} + L_0 (diffusion.losses.nll_bpd) over batches of test images."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure

from diffusion.packaged import DiffusionModel



@dataclass(frozen=True)
class BpdResult:
    """Per-image terms [N] in bits/dim (total = prior + vb + decoder) and the mean per-t curve [T].

    vb_per_t[i] is the mean of L_i over images: i = 0 is the decoder L_0, i ≥ 1 the KL term L_i = L_{t−1} at
    the paper's t = i + 1.
    """

    total: np.ndarray
    prior: np.ndarray
    vb: np.ndarray
    decoder: np.ndarray
    vb_per_t: np.ndarray

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        n = self.total.size
        return {
            f"{prefix}_bpd": float(self.total.mean()),
            f"{prefix}_prior_bpd": float(self.prior.mean()),
            f"{prefix}_vb_bpd": float(self.vb.mean()),
            f"{prefix}_decoder_bpd": float(self.decoder.mean()),
            f"{prefix}_bpd_stderr": float(self.total.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            f"{prefix}_bpd_num_images": float(n),
        }


def select_images(images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A seeded random subset of min(count, N) images from [N, ...] (all of them when N ≤ count, in random order)."""
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


def evaluate_bpd(
    model: DiffusionModel,
    images: torch.Tensor,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> BpdResult:
    """nll_bpd of a DiffusionModel on images [N, C, H, W] in [−1, 1], `batch_size` at a time, noise from one
    generator seeded with `seed`. `progress(1)` is called after each of the N/batch_size · T model calls."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"test_images must be [N, {', '.join(map(str, model.image_shape))}] to match the model, "
                         f"got {tuple(images.shape)}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    callback = None if progress is None else (lambda done, total: progress(1))
    model.eval()
    parts = []
    for first in range(0, images.shape[0], batch_size):
        x0 = images[first:first + batch_size].to(device, torch.float32)
        out = model.nll_bpd(x0, generator=generator, progress=callback)  # its prediction type and Σ_θ
        parts.append({k: v.double().cpu() for k, v in out.items()})
    cat = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
    return BpdResult(total=cat["total_bpd"], prior=cat["prior_bpd"], vb=cat["vb_bpd"], decoder=cat["decoder_bpd"],
                     vb_per_t=cat["vb_per_t"].mean(axis=0))


def write_vb_per_t_csv(result: BpdResult, path: Path) -> Path:
    """Columns: t (paper's 1..T), term (L_0 or L_{t−1}), mean bits/dim."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t", "term", "bits_per_dim"])
        for i, value in enumerate(result.vb_per_t):
            writer.writerow([i + 1, "decoder L_0" if i == 0 else f"L_{i}", f"{value:.8g}"])
    return path


def plot_vb_per_t(result: BpdResult, path: Path) -> Path:
    """PNG: L_{t−1} (bits/dim, log scale) against t, with the decoder L_0 at t = 1 and the totals in the title."""
    t = np.arange(1, result.vb_per_t.size + 1)
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(t[1:], np.clip(result.vb_per_t[1:], 1e-12, None), lw=1.2, label="KL terms $L_{t-1}$, t ≥ 2")
    ax.scatter([1], [max(result.vb_per_t[0], 1e-12)], color="C3", zorder=3,
               label=f"decoder $L_0$ = {result.vb_per_t[0]:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("bits/dim")
    ax.set_title(f"total {result.total.mean():.3f} bpd = prior {result.prior.mean():.2g} + "
                 f"Σ KL {result.vb.mean():.3f} + decoder {result.decoder.mean():.3f}  (N = {result.total.size})",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    return path
