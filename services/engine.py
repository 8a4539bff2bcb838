"""Batched sampling, likelihood and interpolation on one loaded model — plain torch, no Ray, no HTTP.

The serving deployment and the in-process benchmark baseline both call `Engine`, and all of the continuous
batching lives here: every request in flight is a `Trajectory` (a `diffusion.samplers` state at its own step), and
one `tick` advances all of them with ONE model call (the model takes a t per image), so requests that arrive while
others run join at the next tick instead of waiting for a whole reverse process. Trajectories of different samplers,
step counts and options share each call; afterwards each takes its own sampler step. On a class-conditional model
the call also carries each image's label and guidance scale (`diffusion.guidance.denoise`: guided images are
evaluated a second time with the null class in the same call), so requests for different classes and scales still
share one forward pass.

Each request draws its x_T and per-step noise from its own `torch.Generator(seed)` (on the CPU, so a seed gives the
same noise on any device), in the same order as `diffusion.samplers.sample` with that generator. So a seed
reproduces its images whatever it was batched with (up to float rounding of batched convolutions, far below one
8-bit level).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffusion.guidance import Denoised, check_conditioning, denoise, num_classes_of
from diffusion.losses import nll_bpd
from diffusion.sampler_specs import sampler_spec
from diffusion.samplers import Sampler, SamplerState, ddim_encode, ddim_sample, get_sampler
from diffusion.schedule import NoiseSchedule
from diffusion.unet import null_labels

INTERPOLATE_SPACING = sampler_spec("ddim").options["spacing"].default


@dataclass(frozen=True)
class SampleJob:
    """One request: `num_images` images from `seed` with a registered sampler on `steps` (possibly respaced) steps,
    `options` being that sampler's (checked against its catalog entry when the job starts). A conditional model
    samples `class_labels` (class indices: one for all images or one per image; None = unconditional, the null
    class) with classifier-free guidance `guidance_scale` (1 = none)."""

    sampler: str
    steps: int
    num_images: int
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    class_labels: tuple[int, ...] | None = None
    guidance_scale: float = 1.0


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
    """One request's reverse process in flight: its sampler, that sampler's state and the request's generator."""

    job: SampleJob
    sampler: Sampler
    state: SamplerState  # state.x: [N, C, H, W] on the engine's device
    generator: torch.Generator
    labels: torch.Tensor | None = None  # [N] int64 on the engine's device; None = null class
    started: float | None = None  # perf_counter at its first model call
    max_tick_images: int = 0  # the largest model call (in images, guided ones counting twice) it took part in

    @property
    def done(self) -> bool:
        return self.state.done

    @property
    def progress(self) -> tuple[int, int]:
        """(model calls done, model calls in all)."""
        return self.state.nfe, self.sampler.total_calls(self.state)


class Engine:
    """A model (`model(x_t, t) -> eps`, or `model(x_t, t, y)` for a class-conditional one; with `.schedule()` and
    `.image_shape`) on a device, ready to sample."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.schedule: NoiseSchedule = model.schedule()
        self.image_shape: tuple[int, int, int] = tuple(model.image_shape)
        self.counters = {"ticks": 0, "tick_images": 0, "busy_s": 0.0}

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    # -- continuous batching: every in-flight request advances one model call per tick, all in one model call

    @property
    def num_classes(self) -> int | None:
        return num_classes_of(self.model)

    def labels_for(self, job: SampleJob) -> torch.Tensor | None:
        """The job's class labels as [num_images] int64 on the device (None = unconditional); a label count other
        than 1 or num_images, a label outside the model's classes, conditioning an unconditional model, or a guidance
        scale ≠ 1 without labels is a ValueError."""
        check_conditioning(self.model, job.class_labels, job.guidance_scale)
        if not math.isfinite(job.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {job.guidance_scale}")
        if job.class_labels is None:
            if job.guidance_scale != 1.0:
                raise ValueError(f"guidance_scale {job.guidance_scale} needs class_labels (guiding the null class "
                                 "towards itself changes nothing)")
            return None
        labels = list(job.class_labels)
        if len(labels) not in (1, job.num_images):
            raise ValueError(f"class_labels has {len(labels)} labels; give 1 or num_images={job.num_images}")
        bad = [label for label in labels if isinstance(label, bool) or not isinstance(label, numbers.Integral)
               or not 0 <= label < self.num_classes]
        if bad:
            raise ValueError(f"class_labels {bad} outside the model's classes 0..{self.num_classes - 1}")
        labels = labels * job.num_images if len(labels) == 1 else labels
        return torch.tensor([int(label) for label in labels], dtype=torch.long, device=self.device)

    def start(self, job: SampleJob) -> Trajectory:
        """A request's reverse process before its first model call: x_T drawn from its own generator. A bad
        sampler, option, step count or class label is a ValueError that names it."""
        sampler = get_sampler(job.sampler)
        labels = self.labels_for(job)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        x = torch.randn((job.num_images, *self.image_shape), generator=generator).to(self.device)
        return Trajectory(job, sampler, sampler.start(self.schedule, x, job.steps, **job.options), generator, labels)

    @torch.inference_mode()
    def tick(self, trajectories: list[Trajectory], max_forward: int = 1024) -> None:
        """One model call for every unfinished trajectory (each image with its own t, label and guidance scale;
        chunked at `max_forward` images, guided images counting twice), then each sampler's step."""
        active = [tr for tr in trajectories if not tr.done]
        if not active:
            return
        start = time.perf_counter()
        inputs = [tr.sampler.model_input(tr.state) for tr in active]
        sizes = [xi.shape[0] for xi, _ in inputs]
        x = torch.cat([xi for xi, _ in inputs])  # [ΣN, C, H, W]
        t = torch.cat([torch.full((n,), ti, dtype=torch.long) for n, (_, ti) in zip(sizes, inputs)]).to(self.device)
        y = scale = None
        if self.num_classes is not None:
            y = torch.cat([tr.labels if tr.labels is not None else null_labels(self.num_classes, n, self.device)
                           for tr, n in zip(active, sizes)])
            scale = torch.cat([torch.full((n,), tr.job.guidance_scale) for tr, n in zip(active, sizes)])  # host
        guided = 0 if scale is None else int((scale != 1.0).sum())  # rows evaluated twice; on the host: no sync
        chunk = max(1, max_forward // 2) if guided else max_forward
        outs = [denoise(self.model, x[k:k + chunk], t[k:k + chunk], None if y is None else y[k:k + chunk],
                        1.0 if scale is None else scale[k:k + chunk]) for k in range(0, x.shape[0], chunk)]
        forward_images = x.shape[0] + guided
        for tr, part in zip(active, Denoised.cat(outs).split(sizes)):
            tr.started = start if tr.started is None else tr.started
            tr.max_tick_images = max(tr.max_tick_images, forward_images)
            tr.sampler.step(tr.state, part, tr.generator)
        self.counters["ticks"] += 1
        self.counters["tick_images"] += forward_images
        self.counters["busy_s"] += time.perf_counter() - start

    @staticmethod
    def result(tr: Trajectory) -> torch.Tensor:
        """A finished trajectory's images: CPU float32 [N, C, H, W] in [−1, 1]."""
        assert tr.done, "trajectory still running"
        return tr.state.x.float().clamp(-1.0, 1.0).cpu()

    def sample(self, jobs: list[SampleJob], progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
        """Run `jobs` together to completion → one CPU float32 tensor [num_images, C, H, W] in [−1, 1] per job."""
        active = [self.start(job) for job in jobs]
        total = max(tr.progress[1] for tr in active)
        for k in range(total):
            self.tick(active)
            if progress is not None:
                progress(k + 1, total)
        return [self.result(tr) for tr in active]

    @torch.inference_mode()
    def likelihood(self, x0: torch.Tensor, seed: int = 0) -> dict[str, list[float]]:
        """ELBO in bits/dim per image (full T-step bound, one noise sample per term). x0: [B, C, H, W] in [−1, 1]."""
        generator = torch.Generator(self.device).manual_seed(seed)
        if hasattr(self.model, "nll_bpd"):  # a packaged model: its prediction type and learned variance
            terms = self.model.nll_bpd(x0.to(self.device), generator=generator)
        else:
            terms = nll_bpd(self.model, self.schedule, x0.to(self.device), generator=generator)
        names = ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd")
        return {name: terms[name].double().cpu().tolist() for name in names}

    @torch.inference_mode()
    def interpolate(self, x0: torch.Tensor, num_points: int, steps: int, clip_denoised: bool = False) -> torch.Tensor:
        """DDIM-encode two images [2, C, H, W] to x_T, slerp `num_points` latents (ends included), decode (η = 0).
        → CPU [num_points, C, H, W] in [−1, 1]."""
        assert x0.shape[0] == 2, f"interpolate needs exactly 2 images, got {x0.shape[0]}"
        latents = ddim_encode(self.model, self.schedule, x0.to(self.device), steps=steps, spacing=INTERPOLATE_SPACING)
        path = torch.stack([slerp(latents[0], latents[1], k / (num_points - 1)) for k in range(num_points)])
        images = ddim_sample(self.model, self.schedule, tuple(path.shape), steps=steps, eta=0.0, x_T=path,
                             clip_x0=clip_denoised, device=self.device, spacing=INTERPOLATE_SPACING)
        return images.float().clamp(-1.0, 1.0).cpu()
