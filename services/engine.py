"""Batched sampling, likelihood and interpolation on one loaded model — plain torch, no Ray, no HTTP.

The serving deployment and the in-process benchmark baseline both call `Engine`. Sampling is continuously
batched: every request in flight is a `Trajectory` at its own step index, and one `tick` advances all of them by
one step with ONE model call (the model takes a t per image), so requests that arrive while others run join at the
next step instead of waiting for a whole reverse process. After the model call, trajectories sharing
`SampleJob.key` (sampler, steps, eta, clip) and step index take one vectorised DDPM/DDIM step.

Each request draws its x_T and per-step noise from its own `torch.Generator(seed)` (on the CPU, so a seed gives the
same noise on any device), in the same order as `diffusion.samplers.ddpm_sample` / `ddim_sample` with that
generator. So a seed reproduces its images whatever it was batched with (up to float rounding of batched
convolutions, far below one 8-bit level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

import torch

from diffusion.losses import nll_bpd
from diffusion.samplers import ddim_encode, ddim_sample, ddim_step, ddpm_step
from diffusion.schedule import NoiseSchedule, spaced_timesteps

SamplerName = Literal["ddpm", "ddim"]
# The spacings diffusion.samplers uses by default, so a served request equals the library loop with its generator.
SPACING = {"ddpm": "linspace", "ddim": "leading"}


@dataclass(frozen=True)
class SampleJob:
    """One request: `num_images` images from `seed` with a sampler on `steps` (possibly respaced) steps."""

    sampler: SamplerName
    steps: int
    num_images: int
    seed: int
    eta: float = 0.0
    clip_denoised: bool = True

    @property
    def key(self) -> tuple:
        """Jobs with equal keys run in one batched loop."""
        return (self.sampler, self.steps, self.eta if self.sampler == "ddim" else 0.0, self.clip_denoised)


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; "cuda" without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(device)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between latents a, b (any shape, treated as flat vectors); linear when parallel."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm()).clamp_min(1e-12)
    theta = float(torch.arccos(cos.clamp(-1.0, 1.0)))
    if theta < 1e-6:
        return (1 - alpha) * a + alpha * b
    return (math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)


@dataclass(eq=False)
class Trajectory:
    """One request's reverse process in flight: its own schedule, generator and current x at index `i`."""

    job: SampleJob
    sched: NoiseSchedule
    generator: torch.Generator
    x: torch.Tensor  # [N, C, H, W] on the engine's device
    i: int  # the next step's index in `sched`; −1 once finished

    @property
    def done(self) -> bool:
        return self.i < 0


class Engine:
    """A model (`model(x_t, t) -> eps`, with `.schedule()` and `.image_shape`) on a device, ready to sample."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.schedule: NoiseSchedule = model.schedule()
        self.image_shape: tuple[int, int, int] = tuple(model.image_shape)
        self._respaced = lru_cache(maxsize=64)(self._respace)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def _respace(self, sampler: SamplerName, steps: int) -> NoiseSchedule:
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_timesteps}], got {steps}")
        if steps == self.num_timesteps:
            return self.schedule
        return self.schedule.respace(spaced_timesteps(self.num_timesteps, steps, SPACING[sampler]))

    # -- continuous batching: every in-flight request advances one step per tick, all in one model call

    def start(self, job: SampleJob) -> "Trajectory":
        """A request's reverse process at its first step: x_T drawn from its own generator."""
        sched = self._respaced(job.sampler, job.steps)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        x = torch.randn((job.num_images, *self.image_shape), generator=generator).to(self.device)
        return Trajectory(job, sched, generator, x, sched.num_timesteps - 1)

    @torch.inference_mode()
    def tick(self, active: list["Trajectory"], max_forward: int = 1024) -> None:
        """One reverse step for every unfinished trajectory: ONE model call over all of them (each image with its
        own t, chunked at `max_forward` images), then one vectorised step per group at the same (key, index)."""
        active = [tr for tr in active if not tr.done]
        if not active:
            return
        x = torch.cat([tr.x for tr in active])  # [ΣN, C, H, W]
        t = torch.cat([torch.full((tr.x.shape[0],), int(tr.sched.timesteps[tr.i]), dtype=torch.long)
                       for tr in active]).to(self.device)
        eps = torch.cat([self.model(xc, tc).to(x.dtype) for xc, tc in zip(x.split(max_forward), t.split(max_forward))])
        groups: dict[tuple, list[tuple[Trajectory, torch.Tensor]]] = {}
        for tr, e in zip(active, eps.split([tr.x.shape[0] for tr in active])):
            groups.setdefault((tr.job.key, tr.i), []).append((tr, e))
        for members in groups.values():
            self._step([tr for tr, _ in members], torch.cat([e for _, e in members]))

    def _step(self, group: list["Trajectory"], eps: torch.Tensor) -> None:
        """x_{i−1} for trajectories sharing sampler, schedule, η, clip and index i; each draws its own noise."""
        first, i = group[0], group[0].i
        x = torch.cat([tr.x for tr in group])

        def noise() -> torch.Tensor:
            return torch.cat([torch.randn(tr.x.shape, generator=tr.generator) for tr in group]).to(self.device)

        if first.job.sampler == "ddpm":
            x = ddpm_step(first.sched, eps, x, i, noise() if i > 0 else None, clip_x0=first.job.clip_denoised)
        else:
            z = noise() if first.job.eta > 0 and i > 0 else None
            x = ddim_step(first.sched, eps, x, i, first.job.eta, z, clip_x0=first.job.clip_denoised)
        for tr, xi in zip(group, x.split([tr.x.shape[0] for tr in group])):
            tr.x, tr.i = xi, tr.i - 1

    @staticmethod
    def result(tr: "Trajectory") -> torch.Tensor:
        """A finished trajectory's images: CPU float32 [N, C, H, W] in [−1, 1]."""
        assert tr.done, "trajectory still running"
        return tr.x.float().clamp(-1.0, 1.0).cpu()

    def sample(self, jobs: list[SampleJob], progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
        """Run `jobs` together to completion → one CPU float32 tensor [num_images, C, H, W] in [−1, 1] per job."""
        active = [self.start(job) for job in jobs]
        total = max(tr.i + 1 for tr in active)
        for k in range(total):
            self.tick(active)
            if progress is not None:
                progress(k + 1, total)
        return [self.result(tr) for tr in active]

    @torch.inference_mode()
    def likelihood(self, x0: torch.Tensor, seed: int = 0) -> dict[str, list[float]]:
        """ELBO in bits/dim per image (full T-step bound, one noise sample per term). x0: [B, C, H, W] in [−1, 1]."""
        generator = torch.Generator(self.device).manual_seed(seed)
        terms = nll_bpd(self.model, self.schedule, x0.to(self.device), generator=generator)
        names = ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd")
        return {name: terms[name].double().cpu().tolist() for name in names}

    @torch.inference_mode()
    def interpolate(self, x0: torch.Tensor, num_points: int, steps: int, clip_denoised: bool = False) -> torch.Tensor:
        """DDIM-encode two images [2, C, H, W] to x_T, slerp `num_points` latents (ends included), decode (η = 0).
        → CPU [num_points, C, H, W] in [−1, 1]."""
        assert x0.shape[0] == 2, f"interpolate needs exactly 2 images, got {x0.shape[0]}"
        latents = ddim_encode(self.model, self.schedule, x0.to(self.device), steps=steps, spacing=SPACING["ddim"])
        path = torch.stack([slerp(latents[0], latents[1], k / (num_points - 1)) for k in range(num_points)])
        images = ddim_sample(self.model, self.schedule, tuple(path.shape), steps=steps, eta=0.0, x_T=path,
                             clip_x0=clip_denoised, device=self.device, spacing=SPACING["ddim"])
        return images.float().clamp(-1.0, 1.0).cpu()
