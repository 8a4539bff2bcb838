"""Training configuration: the DDPM recipe as defaults, validated before Ray starts (unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from diffusion.objectives import check_objective
from diffusion.unet import PRESETS, UNetConfig
from pipelines.strict import StrictConfig


class ModelConfig(StrictConfig):
    """A U-Net preset plus field overrides (any `diffusion.unet.UNetConfig` field), and what the network predicts.

    prediction      eps | v | x0 (diffusion.parameterization converts each to ε̂ and x̂_0 for samplers and the ELBO)
    learn_variance  2C output channels, Σ_θ interpolating β and β̃ (Improved DDPM eq. 15); needs objective l_hybrid
                    or l_vlb
    num_classes     None = unconditional; "auto" = the class count of the ingest manifest; or a count
    """

    preset: str = "small"
    ch: PositiveInt | None = None
    ch_mult: tuple[PositiveInt, ...] | None = None
    num_res_blocks: PositiveInt | None = None
    attn_resolutions: tuple[PositiveInt, ...] | None = None
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    norm_groups: PositiveInt | None = None
    prediction: Literal["eps", "v", "x0"] = "eps"
    learn_variance: bool = False
    num_classes: PositiveInt | Literal["auto"] | None = None

    @model_validator(mode="after")
    def _known_preset(self) -> "ModelConfig":
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose from {sorted(PRESETS)}")
        return self

    def unet_config(self, image_size: int, channels: int, classes: list[str] | None = None) -> UNetConfig:
        """The U-Net for images of this size; `classes` (the manifest's class names) resolves num_classes "auto"."""
        overrides = {k: v for k, v in self.model_dump(exclude={"preset", "prediction", "num_classes"}).items()
                     if v is not None}
        num_classes = self.num_classes
        if num_classes == "auto":
            if not classes:
                raise ValueError("model.num_classes is 'auto' but the ingest manifest records no classes "
                                 "(a source without labels); set model.num_classes to null or a count")
            num_classes = len(classes)
        return UNetConfig.preset(self.preset, image_size=image_size, in_channels=channels, num_classes=num_classes,
                                 **overrides)


class ScheduleConfig(StrictConfig):
    """`zero_terminal_snr` rescales the schedule so that ᾱ = 0 at the last step (Lin et al. 2024); it needs
    model.prediction v, and samplers then start at T − 1 (spacing "trailing")."""

    name: Literal["linear", "cosine"] = "linear"
    num_timesteps: PositiveInt = 1000
    zero_terminal_snr: bool = False


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
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each "
                                                    "training worker needs besides its CPUs/GPU (e.g. {trainer: 1} "
                                                    "to place workers on the nodes that advertise it)")
    lr: float = Field(default=2e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_steps: int = Field(default=5000, ge=0)
    grad_clip: float = Field(default=1.0, gt=0.0)
    seed: int = 0
    loader: Literal["webdataset", "ray_data"] = "webdataset"
    loader_cache_mb: float = Field(default=1024.0, ge=0.0, description="webdataset loader: decoded shards each worker "
                                   "keeps in memory after its first epoch; 0 = read and decode every epoch")
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    compile: Literal["auto", True, False] = Field(default="auto", description="torch.compile the loss and model "
                                                  "call (fullgraph); auto = on a CUDA device, off on the CPU")
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
    system_metrics_interval_s: float = Field(default=10.0, ge=0.0, description="seconds between MLflow system "
                                             "metrics samples of each training node (CPU, memory, disk, network, "
                                             "GPU); 0 = off")
    objective: Literal["l_simple", "l_hybrid", "l_vlb"] = Field(
        default="l_simple", description="l_simple (Ho et al. eq. 14) | l_hybrid (+ λ L_vlb, λ = 0.001, learned "
        "variance) | l_vlb (importance-sampled t); diffusion.objectives")
    loss_weighting: Literal["none", "min_snr"] = "none"
    snr_gamma: float = Field(default=5.0, gt=0.0, description="γ of min-SNR-γ weighting")
    class_dropout: float | None = Field(default=None, ge=0.0, lt=1.0, description="probability of training a "
                                        "conditional model on the null class; None = 0.1 when conditional")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers}")
        try:
            check_objective(self.objective, self.model.learn_variance, self.loss_weighting)
        except ValueError as error:
            raise ValueError(f"objective / model.learn_variance / loss_weighting: {error}") from None
        if self.schedule.zero_terminal_snr and self.model.prediction != "v":
            raise ValueError("schedule.zero_terminal_snr needs model.prediction 'v' (ε̂ says nothing about x_0 where "
                             "ᾱ = 0)")
        if self.class_dropout is not None and self.model.num_classes is None:
            raise ValueError("class_dropout is set but model.num_classes is null (an unconditional model)")
        if self.sample_ddim_steps > self.schedule.num_timesteps:
            raise ValueError("sample_ddim_steps exceeds schedule.num_timesteps")
        return self

    @property
    def p_uncond(self) -> float:
        """The label-dropout probability actually used (0 for an unconditional model)."""
        if self.model.num_classes is None:
            return 0.0
        return 0.1 if self.class_dropout is None else self.class_dropout

    @property
    def ema_decay(self) -> float:
        from diffusion.ema import decay_for_half_life

        return decay_for_half_life(self.ema.half_life_steps) if self.ema.half_life_steps else self.ema.decay
