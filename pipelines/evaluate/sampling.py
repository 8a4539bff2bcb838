"""Sampler strings ("ddpm-1000", "ddim-50", "ode-heun-18") and timed, seeded generation of samples from a
DiffusionModel with any sampler of `diffusion.samplers.SAMPLERS` (at its default options: DDIM η = 0), of given
classes with classifier-free guidance when the model is class-conditional."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from diffusion.sampler_specs import SAMPLER_NAMES, SAMPLER_SPECS
from diffusion.samplers import sample

_STEPS = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class SamplerRun:
    """One row of the quality table: sampler `kind` (a name in SAMPLER_NAMES) on `steps` reverse steps."""

    name: str
    kind: str
    steps: int

    @property
    def model_calls(self) -> int:
        """Model calls (NFE) to sample one batch."""
        return SAMPLER_SPECS[self.kind].model_calls(self.steps)


def parse_sampler(text: str) -> SamplerRun:
    """"ddim-50" → SamplerRun("ddim-50", "ddim", 50); the steps follow the last hyphen, so names may hold hyphens
    ("ode-heun-18"). Raises ValueError naming the string otherwise."""
    kind, _, steps = text.rpartition("-") if isinstance(text, str) else ("", "", "")
    if kind not in SAMPLER_NAMES or not _STEPS.fullmatch(steps):
        raise ValueError(f"sampler {text!r} is not of the form '<name>-<steps>' with a name in "
                         f"{', '.join(SAMPLER_NAMES)}, e.g. 'ddpm-1000' or 'ddim-50'")
    return SamplerRun(name=text, kind=kind, steps=int(steps))


def check_steps(spec: SamplerRun, num_timesteps: int) -> None:
    """Raise ValueError naming the sampler when it asks for more steps than the model was trained with."""
    if spec.steps > num_timesteps:
        raise ValueError(f"sampler {spec.name!r} asks for {spec.steps} steps but the model has only {num_timesteps}")


@dataclass(frozen=True)
class GeneratedSamples:
    images: torch.Tensor  # [N, C, H, W] in [−1, 1]
    seconds: float  # wall time of the sampling loops only

    @property
    def samples_per_s(self) -> float:
        return self.images.shape[0] / self.seconds


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """[num_samples] int64 cycling 0, 1, …, K−1: every class gets ⌊N/K⌋ or ⌈N/K⌉ samples, the lower classes the
    extra ones."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return torch.arange(num_samples, dtype=torch.long) % num_classes


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    spec: SamplerRun,
    num_samples: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> GeneratedSamples:
    """Draw `num_samples` images in batches from one torch.Generator seeded with `seed` (same x_T for every sampler
    and every guidance scale).

    labels [num_samples] int64 (class-conditional models only; None = the null class) with classifier-free guidance
    scale `guidance_scale` (see diffusion.guidance; the model checks the labels' range).
    One untimed model call comes first, so one-off initialisation is not billed to the sampler.
    `model` is a DiffusionModel (needs `.schedule()`, `.image_shape`); `progress(k)` is called after every model call.
    Returns images [num_samples, C, H, W] on the CPU, clamped to [−1, 1], and the wall time spent sampling.
    """
    if labels is not None and (labels.shape != (num_samples,) or labels.dtype != torch.long):
        raise ValueError(f"labels must be int64 [{num_samples}], got {labels.dtype} {tuple(labels.shape)}")
    sched = model.schedule()
    check_steps(spec, sched.num_timesteps)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    step_callback = None if progress is None else (lambda done, total: progress(1))
    batches = []
    model.eval()
    warm = torch.zeros((min(batch_size, num_samples), *model.image_shape), device=device)
    model(warm, torch.zeros(warm.shape[0], dtype=torch.long, device=device))  # lazy initialisation goes untimed
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        shape = (min(batch_size, num_samples - first), *model.image_shape)
        y = None if labels is None else labels[first:first + shape[0]].to(device)
        x = sample(model, sched, shape, spec.kind, spec.steps, generator=generator, progress=step_callback, y=y,
                   guidance_scale=guidance_scale)
        batches.append(x.clamp(-1.0, 1.0).cpu())  # .cpu() waits for the device, so the timing is complete
    seconds = time.perf_counter() - start
    return GeneratedSamples(images=torch.cat(batches), seconds=seconds)
