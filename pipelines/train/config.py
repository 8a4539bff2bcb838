"""Training configuration: the DDPM recipe as defaults, validated before Ray starts (unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from diffusion.unet import PRESETS, UNetConfig
from pipelines.strict import StrictConfig


class ModelConfig(StrictConfig):
    """A U-Net preset plus field overrides (any `diffusion.unet.UNetConfig` field)."""

    preset: str = "small"
    ch: PositiveInt | None = None
    ch_mult: tuple[PositiveInt, ...] | None = None
    num_res_blocks: PositiveInt | None = None
    attn_resolutions: tuple[PositiveInt, ...] | None = None
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    norm_groups: PositiveInt | None = None

    @model_validator(mode="after")
    def _known_preset(self) -> "ModelConfig":
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose from {sorted(PRESETS)}")
        return self

    def unet_config(self, image_size: int, channels: int) -> UNetConfig:
        overrides = {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}
        return UNetConfig.preset(self.preset, image_size=image_size, in_channels=channels, **overrides)


class ScheduleConfig(StrictConfig):
    name: Literal["linear", "cosine"] = "linear"
    num_timesteps: PositiveInt = 1000


class EMAConfig(StrictConfig):
    """decay 0.9999 as in DDPM for long runs; `half_life_steps` (if set) overrides it for short runs."""

    decay: float = Field(default=0.9999, gt=0.0, lt=1.0)
    half_life_steps: float | None = Field(default=None, gt=0.0)
    warmup: bool = True


class TrainConfig(StrictConfig):
    model: ModelConfig = ModelConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ema: EMAConfig = EMAConfig()
    steps: PositiveInt = 3000
    batch_size: PositiveInt = Field(default=128, description="global batch, split evenly over workers")
    workers: PositiveInt = 2
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK", description="how Ray places the workers' bundles; STRICT_SPREAD = one worker per node")
    use_gpu: bool = False
    lr: float = Field(default=2e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_steps: int = Field(default=5000, ge=0)
    grad_clip: float = Field(default=1.0, gt=0.0)
    seed: int = 0
    loader: Literal["webdataset", "ray_data"] = "webdataset"
    loader_cache_mb: float = Field(default=1024.0, ge=0.0, description="webdataset loader: decoded shards each worker "
                                   "keeps in memory after its first epoch; 0 = read and decode every epoch")
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    compile: bool = False
    channels_last: bool = Field(default=True, description="NHWC memory format (faster on CPU too: "
                                                        "benchmarks/profile_train.py)")
    checkpoint_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 20
    eval_every: int = Field(default=1000, ge=0, description="ELBO on the validation split every N steps; 0 = at the end only")
    eval_batches: PositiveInt = 2
    eval_batch_size: PositiveInt = 64
    sample_grid: PositiveInt = Field(default=36, description="images in the DDPM/DDIM sample grids")
    sample_ddpm_steps: PositiveInt | None = Field(default=None, description="respaced DDPM steps for grids; None = all T")
    sample_ddim_steps: PositiveInt = 50
    max_failures: int = Field(default=2, ge=-1)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers}")
        if self.sample_ddim_steps > self.schedule.num_timesteps:
            raise ValueError("sample_ddim_steps exceeds schedule.num_timesteps")
        return self

    @property
    def ema_decay(self) -> float:
        from diffusion.ema import decay_for_half_life

        return decay_for_half_life(self.ema.half_life_steps) if self.ema.half_life_steps else self.ema.decay
