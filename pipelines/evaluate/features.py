"""The feature network for FID and KID, chosen by the config, and images → feature matrices; the digits classifier
that labels conditional samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.digits_net import TrainedDigitsNet, load_or_train_digits_net
from pipelines.evaluate.inception import load_fid_inception

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "raydiff"
DIGITS_NET_SEED = 0  # fixed, not config.seed: FIDs stay comparable across runs that sample with different seeds


@dataclass
class FeatureExtractor:
    """Callable: images [N, C, H, W] in [−1, 1] → features [N, F] float64 (numpy), `batch_size` images per call.
    Images are quantised to 8 bits first (`quantize_8bit`), so samples are scored as the PNGs real images came from."""

    name: str
    net: nn.Module  # has .features(x) and is in eval mode
    batch_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metrics: dict[str, float] = field(default_factory=dict)  # facts about the net worth logging
    unseen: torch.Tensor | None = None  # indices of the TRAIN images the net never trained on; None: all of them

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = [self.net.features(quantize_8bit(images[i:i + self.batch_size].to(self.device, torch.float32)))
               .double().cpu()
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out).numpy()


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [−1, 1] → the same images on the 8-bit grid: u = round((x + 1) · 127.5) (clipped), u / 127.5 − 1.
    Real images read from 8-bit files are unchanged."""
    return torch.round((images.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def load_digits_net(config: EvaluateConfig, train_images: torch.Tensor, train_labels: torch.Tensor) -> TrainedDigitsNet:
    """The digits classifier on TRAIN less its hold-out, cached in config.feature_cache_dir (trained if absent)."""
    cache_dir = Path(config.feature_cache_dir).expanduser() if config.feature_cache_dir else DEFAULT_CACHE_DIR
    return load_or_train_digits_net(train_images.cpu(), train_labels.cpu(), DIGITS_NET_SEED, cache_dir)


def build_feature_extractor(
    config: EvaluateConfig, train_images: torch.Tensor, train_labels: torch.Tensor, device: torch.device | str = "cpu",
    digits_net: TrainedDigitsNet | None = None,
) -> FeatureExtractor:
    """"inception": load the local weights file; "digits": the cached (or freshly trained) classifier on TRAIN less
    its hold-out (`digits_net` when given, else loaded)."""
    device = torch.device(device)
    if config.fid_feature_net == "inception":
        net = load_fid_inception(config.inception_weights)  # the config guarantees a path
        return FeatureExtractor("inception", net.to(device), config.sample_batch_size, device)
    trained = digits_net or load_digits_net(config, train_images, train_labels)
    return FeatureExtractor("digits", trained.net.to(device), config.sample_batch_size, device,
                            {"fid_net_val_accuracy": trained.val_accuracy}, unseen=trained.holdout)
