"""DDIM (Song et al. 2021): the step function (eq. 12), the sampler, and deterministic inversion x_0 → x_T."""

from __future__ import annotations

import math

import torch

from diffusion.process import eps_from_x0, x0_from_eps
from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Progress, Steps, Walk, model_eps, register, respaced
from diffusion.schedule import NoiseSchedule, Spacing


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
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z   (eq. 12). All [B, ...].

    1. x̂_0 from ε ("predicted x_0"; or the model's own `x0`); when clipped, ε is recomputed from the clipped x̂_0 so both stay consistent
    2. σ from η (eq. 16)
    3. "direction pointing to x_t" √(1 − ᾱ_prev − σ²) ε plus noise σ z
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
    if x0 is None:
        x0 = x0_from_eps(x_t, eps, abar)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(x_t, x0, abar)
    sigma = ddim_sigma(sched, i, eta)
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        assert noise is not None and noise.shape == x_t.shape, "ddim_step with eta > 0 needs noise shaped like x_t"
        x_prev = x_prev + sigma * noise
    return x_prev


@register(SAMPLER_SPECS["ddim"], zero_terminal_snr=True)
def ddim(walk: Walk) -> Steps:
    """Eq. 12 on the respaced schedule; noise is drawn (after the model call) only when η > 0 and i > 0."""
    x, eta = walk.x_T, walk.options["eta"]
    for i in walk.indices():
        out = yield x, walk.t(i)
        noise = walk.noise() if eta > 0 and i > 0 else None
        x = ddim_step(walk.sched, out.eps, x, i, eta, noise, walk.options["clip_x0"], out.x0)
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
    sched = respaced(sched, steps, spacing)
    x = x0.clone()
    n = sched.num_timesteps
    for i in range(n):
        abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
        eps = model_eps(model, x, int(sched.timesteps[i]))
        x = math.sqrt(abar) * x0_from_eps(x, eps, abar_prev) + math.sqrt(1.0 - abar) * eps
        if progress is not None:
            progress(i + 1, n)
    return x
