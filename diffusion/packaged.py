"""A trained network packaged with what sampling needs: the U-Net config, the noise schedule, what the network
predicts, its classes and the image spec.

This is the object logged to MLflow (`mlflow.pytorch.log_model(..., serialization_format="pickle")`) and loaded
by the serving layer. `model(x_t, t, y=None)` is always ε̂ (whatever the network predicts: eps, v or x0), so every
ε-sampler works unchanged; `model.denoise(x_t, t, y)` gives ε̂, x̂_0 and the learned-variance values
(`diffusion.guidance.Denoised`); `model.nll_bpd(x0)` is the ELBO with the model's own Σ_θ; `model.schedule()`
rebuilds the training schedule (zero-terminal-SNR rescaled if trained so).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion.guidance import Denoised
from diffusion.losses import nll_bpd
from diffusion.objectives import rescale_zero_terminal_snr
from diffusion.parameterization import check_prediction, model_prediction, split_output
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet, UNetConfig


def build_schedule(name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> NoiseSchedule:
    """The training schedule by name ("linear" | "cosine"), zero-terminal-SNR rescaled when asked."""
    sched = NoiseSchedule.from_name(name, num_timesteps)
    return rescale_zero_terminal_snr(sched) if zero_terminal_snr else sched


class DiffusionModel(nn.Module):
    # Class-level defaults: models pickled before these fields existed load as ε-prediction, linear-SNR, no classes.
    prediction = "eps"
    zero_terminal_snr = False
    class_names: tuple[str, ...] | None = None

    def __init__(self, unet: UNet, schedule: str = "linear", num_timesteps: int = 1000, metadata: dict | None = None,
                 prediction: str = "eps", zero_terminal_snr: bool = False, class_names=None):
        super().__init__()
        check_prediction(prediction)
        self.unet = unet
        self.schedule_name = schedule
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.zero_terminal_snr = zero_terminal_snr
        if class_names is not None:
            if unet.config.num_classes is None or len(class_names) != unet.config.num_classes:
                raise ValueError(f"{len(class_names)} class names for a model with num_classes="
                                 f"{unet.config.num_classes}")
            self.class_names = tuple(str(name) for name in class_names)
        self.metadata = dict(metadata or {})
        self._schedule = self._build_schedule()  # fails now, not at sampling time, on an unknown schedule

    def _build_schedule(self) -> NoiseSchedule:
        return build_schedule(self.schedule_name, self.num_timesteps, self.zero_terminal_snr)

    def schedule(self) -> NoiseSchedule:
        if "_schedule" not in self.__dict__:  # a model pickled before the schedule was cached
            self._schedule = self._build_schedule()
        return self._schedule

    @property
    def learn_variance(self) -> bool:
        return self.unet.config.learn_variance

    @property
    def num_classes(self) -> int | None:
        return getattr(self.unet.config, "num_classes", None)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Denoised:
        """x: [B, C, H, W], t: [B] int64 original timesteps, y: [B] int64 labels or None → ε̂, x̂_0 (None for an
        ε-prediction model), v_Σ (None without a learned variance)."""
        output = self.unet(x, t) if y is None else self.unet(x, t, y)
        pred, var_values = split_output(output, self.learn_variance)
        if self.prediction == "eps":  # samplers derive x̂_0 from ε̂ themselves, exactly as for any ε-model
            return Denoised(pred, None, var_values)
        parts = model_prediction(self.schedule(), x, t, pred, self.prediction)
        return Denoised(parts.eps, parts.x0, var_values)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] int64 (original timesteps), y: [B] int64 or None → ε̂: [B, C, H, W]."""
        if self.prediction == "eps" and not self.learn_variance:
            return self.unet(x, t) if y is None else self.unet(x, t, y)
        return self.denoise(x, t, y).eps

    def nll_bpd(self, x0: torch.Tensor, generator: torch.Generator | None = None, progress=None) -> dict:
        """The full ELBO in bits/dim (diffusion.losses.nll_bpd) read through this model's prediction type and
        learned Σ_θ; a conditional model is scored unconditionally (null class). x0: [B, C, H, W] in [−1, 1]."""
        return nll_bpd(self.unet, self.schedule(), x0, generator=generator, progress=progress,
                       prediction=self.prediction, learn_variance=self.learn_variance)

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this model generates."""
        c = self.unet.config
        return (c.in_channels, c.image_size, c.image_size)

    def describe(self) -> dict:
        """JSON-ready summary: U-Net config, schedule, parameterization, classes, image shape, training metadata."""
        return {"unet": self.config.to_dict(), "schedule": self.schedule_name, "num_timesteps": self.num_timesteps,
                "zero_terminal_snr": self.zero_terminal_snr, "prediction": self.prediction,
                "learn_variance": self.learn_variance, "num_classes": self.num_classes,
                "class_names": list(self.class_names) if self.class_names else None,
                "image_shape": list(self.image_shape), **self.metadata}
