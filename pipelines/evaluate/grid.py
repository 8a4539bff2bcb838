"""Image grids as PNG files (sample grids for evaluation and for training checkpoints; per-class grids with a
labelled row per class for conditional samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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


def save_class_grid(
    images: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: str | Path, per_class: int = 10,
    padding: int = 2, pad_value: int = 255, scale: int = 1,
) -> Path:
    """Write a PNG grid with one row per class k of `class_names` (labelled with its name on the left): the first
    `per_class` images [N, C, H, W] in [−1, 1] whose labels [N] equal k, blank cells where there are fewer.

    The image part is laid out as save_grid's with nrow = per_class; the label strip adds a margin on the left."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_class_grid needs images [N>0, C in (1, 3), H, W], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
    if per_class < 1 or scale < 1 or padding < 0 or not class_names:
        raise ValueError(f"save_class_grid needs per_class >= 1, scale >= 1, padding >= 0 and class names; got "
                         f"{per_class}, {scale}, {padding}, {class_names!r}")
    pixels = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)  # [N, H·s, W·s, C]
    blank = np.full_like(pixels[0], pad_value)
    cells = []
    for k in range(len(class_names)):
        chosen = [pixels[i] for i in (labels == k).nonzero().flatten()[:per_class].tolist()]
        cells += chosen + [blank] * (per_class - len(chosen))
    canvas = grid_canvas(np.stack(cells), per_class, padding, pad_value)
    cell_h = pixels.shape[1]
    font = ImageFont.load_default(size=max(10, min(24, cell_h // 2)))
    margin = padding + max(int(np.ceil(font.getlength(name))) for name in class_names) + 2 * padding
    mode = "L" if canvas.shape[-1] == 1 else "RGB"
    image = Image.new(mode, (canvas.shape[1] + margin, canvas.shape[0]), pad_value if mode == "L" else (pad_value,) * 3)
    image.paste(Image.fromarray(canvas[..., 0] if mode == "L" else canvas), (margin, 0))
    draw = ImageDraw.Draw(image)
    for k, name in enumerate(class_names):
        middle = padding + k * (cell_h + padding) + cell_h // 2
        draw.text((padding, middle), name, fill=0 if mode == "L" else (0, 0, 0), font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
