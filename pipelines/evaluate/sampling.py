"""Sampler strings ("ddpm-1000", "ddim-50") and timed, seeded generation of samples from a DiffusionModel."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from diffusion.samplers import ddim_sample, ddpm_sample

SamplerKind = Literal["ddpm", "ddim"]
_PATTERN = re.compile(r"(ddpm|ddim)-([1-9][0-9]*)")


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the quality table: DDPM ancestral sampling or DDIM η = 0 on `steps` respaced steps."""

    name: str
    kind: SamplerKind
    steps: int


def parse_sampler(text: str) -> SamplerSpec:
    """"ddim-50" → SamplerSpec("ddim-50", "ddim", 50). Raises ValueError naming the string otherwise."""
    match = _PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"sampler {text!r} is not of the form '<ddpm|ddim>-<steps>', e.g. 'ddpm-1000' or 'ddim-50'")
    return SamplerSpec(name=text, kind=match.group(1), steps=int(match.group(2)))  # type: ignore[arg-type]


def check_steps(spec: SamplerSpec, num_timesteps: int) -> None:
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


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    spec: SamplerSpec,
    num_samples: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> GeneratedSamples:
    """Draw `num_samples` images in batches from one torch.Generator seeded with `seed` (same x_T for every sampler).

    One untimed model call comes first, so one-off initialisation is not billed to the sampler.
    `model` is a DiffusionModel (needs `.schedule()`, `.image_shape`); `progress(k)` is called after every model call.
    Returns images [num_samples, C, H, W] on the CPU, clamped to [−1, 1], and the wall time spent sampling.
    """
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
        if spec.kind == "ddpm":
            x = ddpm_sample(model, sched, shape, generator=generator, steps=spec.steps, progress=step_callback)
        else:
            x = ddim_sample(model, sched, shape, steps=spec.steps, eta=0.0, generator=generator, progress=step_callback)
        batches.append(x.clamp(-1.0, 1.0).cpu())  # .cpu() waits for the device, so the timing is complete
    seconds = time.perf_counter() - start
    return GeneratedSamples(images=torch.cat(batches), seconds=seconds)
