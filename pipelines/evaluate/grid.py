"""Image grids as PNG files (sample grids for evaluation and for training checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from diffusion.images import grid_canvas, to_uint8


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2, pad_value: int = 255, scale: int = 1
) -> Path:
    """Write images [N, C, H, W] in [−1, 1] (C = 1 or 3) as a PNG grid of `nrow` images per row.

    Each image is enlarged `scale`× (nearest neighbour) and framed by `padding` pixels of `pad_value`.
    The PNG is (rows·(H·scale + padding) + padding) × (nrow·(W·scale + padding) + padding) pixels. Returns the path.
    """
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid needs images [N>0, C in (1, 3), H, W], got {tuple(images.shape)}")
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError(f"save_grid needs nrow >= 1, scale >= 1, padding >= 0; got {nrow}, {scale}, {padding}")
    pixels = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)  # [N, H·s, W·s, C]
    canvas = grid_canvas(pixels, nrow, padding, pad_value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas).save(path)  # 2-D → "L", [H, W, 3] → "RGB"
    return path
