"""The distill stage's parameters: progressive distillation (Salimans & Ho 2022) from the teacher's DDIM steps down
to `target_steps`, halving every round; validated before Ray starts (unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from pipelines.strict import StrictConfig


class DistillConfig(StrictConfig):
    """method        progressive (each round a student takes one DDIM step where its teacher takes two)
    teacher_steps  the DDIM steps of the trained model that the first round's student halves
    target_steps   the final student's steps; teacher_steps / target_steps must be a power of two
    guidance_scale a class-conditional teacher's classifier-free guidance, distilled in: the student, a conditional
                   model, samples at that strength with guidance scale 1 (no null-class pass)
    """

    method: Literal["progressive"] = "progressive"
    teacher_steps: PositiveInt = 64
    target_steps: PositiveInt = 4
    steps_per_round: PositiveInt = Field(default=500, description="optimizer steps in each halving round")
    batch_size: PositiveInt = Field(default=64, description="global batch, split evenly over workers")
    lr: float = Field(default=1e-4, gt=0.0)
    grad_clip: float = Field(default=1.0, gt=0.0)
    ema_decay: float = Field(default=0.995, gt=0.0, lt=1.0, description="EMA of the student within a round; the "
                             "next round's teacher is this average")
    guidance_scale: float = Field(default=1.0, ge=0.0)
    workers: PositiveInt = 1
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    loader: Literal["webdataset"] = "webdataset"
    loader_cache_mb: float = Field(default=1024.0, ge=0.0)
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    max_failures: int = Field(default=2, ge=-1)
    log_every: PositiveInt = 20
    sample_grid: PositiveInt = Field(default=36, description="images in each round's sample grid")
    num_fid_samples: int = Field(default=256, ge=0, description="samples of each round's student scored against the "
                                 "test split (FID, KID with the digits feature net, as the evaluate stage); 0 = none")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "DistillConfig":
        ratio = self.teacher_steps // self.target_steps
        if self.teacher_steps % self.target_steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"teacher_steps / target_steps must be a power of two ≥ 2 (each round halves the steps), "
                             f"got {self.teacher_steps} / {self.target_steps}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers}")
        return self

    @property
    def rounds(self) -> list[int]:
        """The student's steps after each round: teacher_steps / 2, / 4, …, target_steps."""
        steps, out = self.teacher_steps, []
        while steps > self.target_steps:
            steps //= 2
            out.append(steps)
        return out
