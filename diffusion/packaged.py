"""A trained ε-model packaged with what sampling needs: the U-Net config, the noise schedule and the image spec.

This is the object logged to MLflow (`mlflow.pytorch.log_model(..., serialization_format="pickle")`) and loaded
by the serving layer; `model(x_t, t)` is the U-Net, `model.schedule()` rebuilds the training schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet, UNetConfig


class DiffusionModel(nn.Module):
    def __init__(self, unet: UNet, schedule: str = "linear", num_timesteps: int = 1000, metadata: dict | None = None):
        super().__init__()
        self.unet = unet
        self.schedule_name = schedule
        self.num_timesteps = num_timesteps
        self.metadata = dict(metadata or {})
        self.schedule()  # fail now, not at sampling time, on an unknown schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] int64 (original timesteps) → ε̂: [B, C, H, W]."""
        return self.unet(x, t)

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.schedule_name, self.num_timesteps)

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this model generates."""
        c = self.unet.config
        return (c.in_channels, c.image_size, c.image_size)

    def describe(self) -> dict:
        """JSON-ready summary: U-Net config, schedule, image shape and the training metadata."""
        return {"unet": self.config.to_dict(), "schedule": self.schedule_name, "num_timesteps": self.num_timesteps,
                "image_shape": list(self.image_shape), **self.metadata}
