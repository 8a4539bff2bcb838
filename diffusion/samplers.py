"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2) and DDIM (Song et al. 2021, eq. 12), one step at a time.

Steps are pure functions of the model's ε and explicit noise; loops only call the model and the step.
`i` indexes the (possibly respaced) schedule; the model always receives `sched.timesteps[i]`, the ORIGINAL step.
The last step (i = 0) goes to ᾱ_prev = 1, i.e. it returns x̂_0-based samples at t = 0 with no noise added.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from diffusion.schedule import NoiseSchedule, Spacing, spaced_timesteps

Progress = Callable[[int, int], None]


def _x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def ddpm_step(
    sched: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    i: int,
    noise: torch.Tensor | None,
    variance: Literal["small", "large"] = "small",
    clip_x0: bool = True,
) -> torch.Tensor:
    """x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z, σ_t² = β̃_t ("small") or β_t ("large"); z unused at i = 0. All [B, ...].

    1. x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, optionally clipped to [−1, 1]     (eq. 15)
    2. μ̃_t = coef1 · x̂_0 + coef2 · x_t                                      (eq. 7)
    3. add σ_t z for i > 0                                                  (Alg. 2, line 4)
    """
    x0 = _x0_from_eps(x_t, eps, float(sched.alphas_cumprod[i]))
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean = float(sched.posterior_mean_coef1[i]) * x0 + float(sched.posterior_mean_coef2[i]) * x_t
    if i == 0:
        return mean
    if variance == "small":
        var = float(sched.posterior_variance[i])
    elif variance == "large":
        var = float(sched.betas[i])
    else:
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    assert noise is not None and noise.shape == x_t.shape, "ddpm_step needs noise shaped like x_t for i > 0"
    return mean + math.sqrt(var) * noise


def ddim_sigma(sched: NoiseSchedule, i: int, eta: float) -> float:
    """σ_τ_i(η) = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)   (eq. 16); η = 1 gives √β̃."""
    abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
    return eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))


def ddim_step(
    sched: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    i: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z   (eq. 12). All [B, ...].

    1. x̂_0 from ε ("predicted x_0"); when clipped, ε is recomputed from the clipped x̂_0 so both stay consistent
    2. σ from η (eq. 16)
    3. "direction pointing to x_t" √(1 − ᾱ_prev − σ²) ε plus noise σ z
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
    x0 = _x0_from_eps(x_t, eps, abar)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
    sigma = ddim_sigma(sched, i, eta)
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        assert noise is not None and noise.shape == x_t.shape, "ddim_step with eta > 0 needs noise shaped like x_t"
        x_prev = x_prev + sigma * noise
    return x_prev


def _eps(model: torch.nn.Module, sched: NoiseSchedule, x: torch.Tensor, i: int) -> torch.Tensor:
    t = torch.full((x.shape[0],), int(sched.timesteps[i]), device=x.device, dtype=torch.long)
    eps = model(x, t)
    assert eps.shape == x.shape, f"model output {tuple(eps.shape)} != input {tuple(x.shape)}"
    return eps.to(x.dtype)


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device)


def _respaced(sched: NoiseSchedule, steps: int | None, spacing: Spacing) -> NoiseSchedule:
    if steps is None or steps == sched.num_timesteps:
        return sched
    return sched.respace(spaced_timesteps(sched.num_timesteps, steps, spacing))


def _start(sched: NoiseSchedule, steps: int | None, spacing: Spacing, shape: tuple[int, ...],
           generator: torch.Generator | None, x_T: torch.Tensor | None, device) -> tuple[NoiseSchedule, torch.Tensor, object]:
    """A sampling loop's (respaced schedule, x_T, device): x_T drawn from `generator` unless given."""
    device = device or (generator.device if generator is not None else "cpu")
    x = _randn(shape, generator, device) if x_T is None else x_T.clone()
    return _respaced(sched, steps, spacing), x, device


@torch.no_grad()
def ddpm_sample(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    steps: int | None = None,
    variance: Literal["small", "large"] = "small",
    clip_x0: bool = True,
    spacing: Spacing = "linspace",
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Alg. 2) from x_T ~ N(0, I) of `shape` [B, C, H, W]; `steps` < T respaces the schedule."""
    sched, x, device = _start(sched, steps, spacing, shape, generator, x_T, device)
    n = sched.num_timesteps
    for i in reversed(range(n)):
        noise = _randn(shape, generator, device) if i > 0 else None
        x = ddpm_step(sched, _eps(model, sched, x, i), x, i, noise, variance, clip_x0)
        if progress is not None:
            progress(n - i, n)
    return x


@torch.no_grad()
def ddim_sample(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    shape: tuple[int, ...],
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    spacing: Spacing = "leading",
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """DDIM sampling on `steps` respaced steps (τ by `spacing`; "leading" is the DDIM paper's uniform τ). → [B, C, H, W]."""
    sched, x, device = _start(sched, steps, spacing, shape, generator, x_T, device)
    n = sched.num_timesteps
    for i in reversed(range(n)):
        noise = _randn(shape, generator, device) if eta > 0 and i > 0 else None
        x = ddim_step(sched, _eps(model, sched, x, i), x, i, eta, noise, clip_x0)
        if progress is not None:
            progress(n - i, n)
    return x


@torch.no_grad()
def ddim_encode(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    x0: torch.Tensor,
    steps: int = 50,
    spacing: Spacing = "leading",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 → x_T (the η = 0 ODE run forwards), using ε at the current point.

    Exact inverse of `ddim_sample(..., eta=0, clip_x0=False, x_T=result)` when ε is constant along the path.
    """
    sched = _respaced(sched, steps, spacing)
    x = x0.clone()
    n = sched.num_timesteps
    for i in range(n):
        abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
        eps = _eps(model, sched, x, i)
        x0_hat = (x - math.sqrt(1.0 - abar_prev) * eps) / math.sqrt(abar_prev)
        x = math.sqrt(abar) * x0_hat + math.sqrt(1.0 - abar) * eps
        if progress is not None:
            progress(i + 1, n)
    return x
