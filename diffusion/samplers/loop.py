"""One entry point for every registered sampler, and the paper-named loops kept as thin forms of it."""

from __future__ import annotations

import itertools

import torch

from diffusion.labels import check_conditioning
from diffusion.samplers.base import Progress, get_sampler
from diffusion.samplers.guidance import denoise
from diffusion.schedule import NoiseSchedule


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    shape: tuple[int, ...],
    sampler: str = "ddim",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    **options,
) -> torch.Tensor:
    """x_0 [B, C, H, W] from the sampler registered as `sampler`, on `steps` reverse steps (its default if None).

    A class-conditional model samples class y: [B] int64 (None = the null class, i.e. unconditional) with
    classifier-free guidance scale `guidance_scale` (1 = plain conditional; see diffusion.guidance), one forward
    pass per model call; labels or a scale ≠ 1 on an unconditional model are a ValueError.

    Sampling runs on `device`, by default the model's. x_T ~ N(0, I) of `shape` is drawn from `generator` on the
    generator's device (then moved) unless given; every later draw comes from the same generator, so a seed
    reproduces its samples on any device. `options` are the sampler's (see
    `diffusion.sampler_specs`); one it does not take is a ValueError. `progress(calls done, calls in all)` runs after
    each model call; a run whose model calls differ from its catalog entry's count is an AssertionError.
    """
    impl = get_sampler(sampler)
    check_conditioning(model, y, guidance_scale)
    device = torch.device(device) if device is not None else model_device(model)
    if x_T is None:
        x = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
    x = (x if x_T is None else x_T).to(device, copy=True)
    state = impl.start(sched, x, steps, **options)
    total = impl.total_calls(state)
    while not state.done:
        x_in, t = impl.model_input(state)
        t_batch = torch.full((x_in.shape[0],), t, device=x_in.device, dtype=torch.long)
        impl.step(state, denoise(model, x_in, t_batch, y, guidance_scale), generator)
        if progress is not None:
            progress(state.nfe, total)
    assert state.nfe == total, f"sampler {sampler!r} made {state.nfe} model calls, its catalog entry says {total}"
    return state.x


def model_device(model) -> torch.device:
    """The device of a module's first parameter or buffer; the CPU for a parameterless callable."""
    tensors = itertools.chain(model.parameters(), model.buffers()) if isinstance(model, torch.nn.Module) else ()
    first = next(iter(tensors), None)
    return first.device if first is not None else torch.device("cpu")


def ddpm_sample(model: torch.nn.Module, sched: NoiseSchedule, shape: tuple[int, ...],
                generator: torch.Generator | None = None, steps: int | None = None, **kwargs) -> torch.Tensor:
    """Ancestral sampling (Alg. 2) from x_T ~ N(0, I) of `shape` [B, C, H, W] on all T steps, or `steps` < T
    respaced ("linspace" unless `spacing` says otherwise). kwargs: `variance` ("small" | "large"), `clip_x0`,
    `spacing`, and `sample`'s `x_T`, `device`, `progress`."""
    return sample(model, sched, shape, "ddpm", steps, generator, **kwargs)


def ddim_sample(model: torch.nn.Module, sched: NoiseSchedule, shape: tuple[int, ...], steps: int = 50,
                eta: float = 0.0, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """DDIM sampling on `steps` respaced steps (τ by `spacing`, default "leading": the DDIM paper's uniform τ).
    kwargs: `clip_x0`, `spacing`, and `sample`'s `x_T`, `device`, `progress`. → [B, C, H, W]."""
    return sample(model, sched, shape, "ddim", steps, generator, eta=eta, **kwargs)
