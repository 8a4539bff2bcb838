"""scikit-learn's bundled handwritten digits (1,797 8×8 images, no download) as tensors at a given resolution.

Used by benchmarks and tests; the pipeline's ingest stage has its own reader. Pixel values 0..16 become uint8 via
round(v · 255 / 16), then x = u / 127.5 − 1; other sizes are resized bilinearly from 8×8 (then clamped to [−1, 1]).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def load_digits_tensors(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits → images [1797, 1, size, size] float32 in [−1, 1], labels [1797] int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    u8 = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    x = torch.from_numpy(u8).float().unsqueeze(1) / 127.5 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return x, torch.from_numpy(data.target).long()


def digits_split(size: int = 8, test_fraction: float = 0.2, seed: int = 0):
    """A seeded random split → (train_images, train_labels, test_images, test_labels)."""
    images, labels = load_digits_tensors(size)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    num_test = int(round(test_fraction * images.shape[0]))
    test, train = order[:num_test], order[num_test:]
    return images[train], labels[train], images[test], labels[test]
