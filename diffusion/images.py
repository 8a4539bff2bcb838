"""Model-space images [N, C, H, W] in [−1, 1] → 8-bit pixels, and the grid canvas that evaluation and serving share.

numpy only (no torch import), so the HTTP ingress can encode images without loading torch.
"""

from __future__ import annotations

import math

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[N, C, H, W] float in [−1, 1] (clipped; a numpy array or a torch tensor) → uint8 [N, H, W, C],
    u = round((x + 1) · 127.5)."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().float().cpu().numpy()
    assert images.ndim == 4, f"expected [N, C, H, W], got {images.shape}"
    u = np.rint((np.clip(images.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return u.transpose(0, 2, 3, 1)


def grid_canvas(pixels: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 [N, H, W, C] → one uint8 [rows·(H+p)+p, ncol·(W+p)+p, C] canvas, `nrow` images per row, framed by
    `padding` pixels of `pad_value`."""
    n, h, w, c = pixels.shape
    if n == 0 or nrow < 1 or padding < 0:
        raise ValueError(f"grid_canvas needs N > 0, nrow >= 1, padding >= 0; got {n}, {nrow}, {padding}")
    ncol, rows = min(nrow, n), math.ceil(n / nrow)
    canvas = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for k in range(n):
        top, left = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        canvas[top:top + h, left:left + w] = pixels[k]
    return canvas
