"""A small CNN digit classifier whose penultimate layer gives the features for the embedded default's FID.

Inception-v3 features mean little on 16×16 grayscale digits, so (as for MNIST FIDs in the literature) the feature
network is a classifier trained on the TRAIN split itself, less a seeded hold-out (`holdout_fraction`) it never
sees: the hold-out gives its validation accuracy and the real images of the FID floor (real data the feature net
has seen sits closer to its training features than unseen real data, so it is no fair reference). The same net
labels conditional samples for the class accuracy. Training takes a few seconds on a CPU, is deterministic given
the seed, and is cached in a file keyed by a hash of the data, the seed and the recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 16  # every input is resized (bilinear) to 16×16 first, as Inception resizes to 299×299
RECIPE_VERSION = 2  # bump when the architecture or training loop changes: old cache files are then ignored


@dataclass(frozen=True)
class DigitsNetRecipe:
    in_channels: int = 1
    num_classes: int = 10
    feature_dim: int = 64
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    holdout_fraction: float = 0.3  # of TRAIN, never trained on: validation accuracy and the FID floor's real images


class DigitsFeatureNet(nn.Module):
    """[B, C, H, W] in [−1, 1] → 16×16 → conv32 → pool → conv64 → pool → fc(feature_dim) → fc(num_classes)."""

    def __init__(self, recipe: DigitsNetRecipe):
        super().__init__()
        self.recipe = recipe
        self.conv1 = nn.Conv2d(recipe.in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, recipe.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(recipe.feature_dim, recipe.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] → penultimate activations [B, feature_dim] (after ReLU, as Inception's pool3 features)."""
        assert x.ndim == 4 and x.shape[1] == self.recipe.in_channels, f"expected [B, {self.recipe.in_channels}, H, W]"
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 32, 8, 8]
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # [B, 64, 4, 4]
        return F.relu(self.fc1(h.flatten(1)))  # [B, feature_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] → logits [B, num_classes]."""
        return self.fc2(self.dropout(self.features(x)))


@dataclass(frozen=True)
class TrainedDigitsNet:
    net: DigitsFeatureNet  # in eval mode
    val_accuracy: float  # on the hold-out
    holdout: torch.Tensor  # int64 indices of the images it never trained on, sorted
    cache_path: Path | None


def holdout_split(num_images: int, seed: int, recipe: DigitsNetRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(hold-out indices, training indices) of num_images, both sorted int64: a seeded permutation's first
    round(holdout_fraction · num_images) (at least 1) are held out. The caller's random state is untouched."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    num_holdout = max(1, int(round(recipe.holdout_fraction * num_images)))
    return order[:num_holdout].sort().values, order[num_holdout:].sort().values


def train_digits_net(
    images: torch.Tensor, labels: torch.Tensor, seed: int, recipe: DigitsNetRecipe = DigitsNetRecipe()
) -> tuple[DigitsFeatureNet, float]:
    """Train on images [N, C, H, W] in [−1, 1] and labels [N] int64 less the hold-out of `holdout_split`; returns
    (net in eval mode, accuracy on the hold-out).

    Deterministic for a given seed: the global RNG is forked, so the caller's random state is untouched, and the
    net trains on one CPU thread (the caller's thread count is restored), so the result does not depend on the
    machine's core count; a net this small gains little from more threads and loses much when the cores are busy.
    """
    _check_data(images, labels, recipe)
    val_idx, train_idx = holdout_split(images.shape[0], seed, recipe)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        net = _train(images[train_idx].float(), labels[train_idx].long(), seed, recipe)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        predictions = net(images[val_idx].float()).argmax(dim=1)
    return net, float((predictions == labels[val_idx]).float().mean())


def _train(x_train: torch.Tensor, y_train: torch.Tensor, seed: int, recipe: DigitsNetRecipe) -> DigitsFeatureNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet(recipe)
        optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
        net.train()
        for _ in range(recipe.epochs):
            perm = torch.randperm(x_train.shape[0])
            for first in range(0, x_train.shape[0], recipe.batch_size):
                batch = perm[first:first + recipe.batch_size]
                loss = F.cross_entropy(net(x_train[batch]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return net.eval()


def cache_key(images: torch.Tensor, labels: torch.Tensor, seed: int, recipe: DigitsNetRecipe) -> str:
    """sha256 of the data bytes, labels, seed, recipe and RECIPE_VERSION (hex)."""
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": asdict(recipe), "seed": seed, "version": RECIPE_VERSION,
                         "shape": list(images.shape)}, sort_keys=True).encode())
    h.update(images.detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(labels.detach().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_or_train_digits_net(
    images: torch.Tensor, labels: torch.Tensor, seed: int, cache_dir: str | Path | None,
    recipe: DigitsNetRecipe | None = None,
) -> TrainedDigitsNet:
    """The net for this data and seed from `cache_dir/digits-featnet-<key>.pt`, trained and saved there if absent.

    The default recipe takes its channels from the images and its classes from the labels (max + 1).
    cache_dir None means no cache (train every time). The file is written atomically (temp file + rename).
    """
    if recipe is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else DigitsNetRecipe.num_classes
        recipe = DigitsNetRecipe(in_channels=images.shape[1], num_classes=num_classes)
    holdout = holdout_split(images.shape[0], seed, recipe)[0]
    if cache_dir is None:
        net, accuracy = train_digits_net(images, labels, seed, recipe)
        return TrainedDigitsNet(net, accuracy, holdout, None)
    path = Path(cache_dir) / f"digits-featnet-{cache_key(images, labels, seed, recipe)[:24]}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitsFeatureNet(recipe)
            net.load_state_dict(saved["state_dict"])
        except Exception as exc:
            raise RuntimeError(f"cached digits feature net {path} is unreadable ({exc}); delete it to retrain") from exc
        if not isinstance(saved.get("holdout"), torch.Tensor) or not torch.equal(saved["holdout"], holdout):
            raise RuntimeError(f"cached digits feature net {path} was trained with another hold-out than this torch "
                               "version's seeded split; delete it to retrain")
        return TrainedDigitsNet(net.eval(), float(saved["val_accuracy"]), holdout, path)
    net, accuracy = train_digits_net(images, labels, seed, recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": net.state_dict(), "val_accuracy": accuracy, "holdout": holdout,
                "recipe": asdict(recipe), "seed": seed}, tmp)
    os.replace(tmp, path)
    return TrainedDigitsNet(net, accuracy, holdout, path)


def _check_data(images: torch.Tensor, labels: torch.Tensor, recipe: DigitsNetRecipe) -> None:
    if images.ndim != 4 or images.shape[1] != recipe.in_channels:
        raise ValueError(f"train_images must be [N, {recipe.in_channels}, H, W], got {tuple(images.shape)}")
    if images.shape[0] < 20:
        raise ValueError(f"train_images has {images.shape[0]} images; the digits feature net needs at least 20")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"train_labels must be [N={images.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32) or labels.min() < 0 or labels.max() >= recipe.num_classes:
        raise ValueError(f"train_labels must be integers in [0, {recipe.num_classes - 1}]")
