"""Class labels of a class-conditional model, checked in one place.

A model with K classes (UNetConfig.num_classes = K) takes y: [B] int64 with values in 0..K−1, or K for the null
class of classifier-free guidance; y = None means the null class for every image. An unconditional model takes no
labels and no guidance scale other than 1.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch


def null_labels(num_classes: int, batch: int, device=None) -> torch.Tensor:
    """[batch] int64 filled with the null class (index num_classes)."""
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def check_labels(y: torch.Tensor, num_classes: int, batch: int) -> torch.Tensor:
    """y: [batch] int64 with values in [0, num_classes] (num_classes = null); anything else is a ValueError.

    The values are read only for a CPU tensor outside torch.compile: on an accelerator reading them would be a host
    sync (and a graph break) on every forward, so there labels are checked where they enter (`label_tensor` for
    requests, the data reader for training) and the embedding's own bounds check is the last guard."""
    if y.shape != (batch,) or y.dtype != torch.long:
        raise ValueError(f"class labels must be int64 [{batch}], got {y.dtype} {tuple(y.shape)}")
    if y.device.type != "cpu" or torch.compiler.is_compiling():
        return y
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}] (or {num_classes} = null), "
                         f"got {sorted(set(y.tolist()))}")
    return y


def label_tensor(labels: Sequence[int], num_images: int, num_classes: int, device=None) -> torch.Tensor:
    """Requested class indices (one for all images, or one per image; each an int in 0..num_classes−1, the null
    class not included) as [num_images] int64; any other count or value is a ValueError naming class_labels."""
    labels = list(labels)
    if len(labels) not in (1, num_images):
        raise ValueError(f"class_labels has {len(labels)} labels; give 1 or num_images={num_images}")
    bad = [label for label in labels if isinstance(label, bool) or not isinstance(label, numbers.Integral)
           or not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"class_labels {bad} outside the model's classes 0..{num_classes - 1}")
    labels = labels * num_images if len(labels) == 1 else labels
    return torch.tensor([int(label) for label in labels], dtype=torch.long, device=device)


def num_classes_of(model: torch.nn.Module) -> int | None:
    """The class count of a conditional model (its `num_classes` or its config's), None when unconditional."""
    if hasattr(model, "num_classes"):
        return model.num_classes
    config = getattr(model, "config", None)
    return getattr(config, "num_classes", None)


def check_conditioning(model: torch.nn.Module, y, guidance_scale) -> None:
    """Labels (y: a tensor or sequence, or None) or a guidance scale ≠ 1 on an unconditional model are a ValueError
    that says so."""
    if num_classes_of(model) is not None:
        return
    if y is not None:
        raise ValueError("class labels given, but the model is unconditional (trained without num_classes)")
    scales = torch.as_tensor(guidance_scale, dtype=torch.float64)
    if bool((scales != 1.0).any()):
        raise ValueError(f"guidance_scale {guidance_scale} needs a class-conditional model; this one is "
                         "unconditional (use 1)")
