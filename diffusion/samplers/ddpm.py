"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2): the step function and the sampler."""

from __future__ import annotations

import math

import torch

from diffusion.parameterization import Variance, fixed_variance, log_variance_from_frac
from diffusion.process import x0_from_eps
from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Steps, Walk, register
from diffusion.schedule import NoiseSchedule


def ddpm_step(
    sched: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    i: int,
    noise: torch.Tensor | None,
    variance: Variance = "small",
    clip_x0: bool = True,
    x0: torch.Tensor | None = None,
    log_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z, σ_t² = β̃_t ("small") or β_t ("large"); z unused at i = 0. All [B, ...].

    1. x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t (or the model's own `x0`), optionally clipped to [−1, 1]   (eq. 15)
    2. μ̃_t = coef1 · x̂_0 + coef2 · x_t                                      (eq. 7)
    3. add σ_t z for i > 0                                                  (Alg. 2, line 4)
       with a learned variance, σ_t = exp(½ log Σ_θ) ([B, ...], Improved DDPM eq. 15) replaces the fixed choice
    """
    if x0 is None:
        x0 = x0_from_eps(x_t, eps, float(sched.alphas_cumprod[i]))
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean = float(sched.posterior_mean_coef1[i]) * x0 + float(sched.posterior_mean_coef2[i]) * x_t
    if i == 0:
        return mean
    assert noise is not None and noise.shape == x_t.shape, "ddpm_step needs noise shaped like x_t for i > 0"
    if log_variance is not None:
        return mean + torch.exp(0.5 * log_variance).to(x_t.dtype) * noise
    return mean + math.sqrt(fixed_variance(sched, i, variance)) * noise


@register(SAMPLER_SPECS["ddpm"], zero_terminal_snr=True)
def ddpm(walk: Walk) -> Steps:
    """Alg. 2 on the (possibly respaced) schedule; one model call per step, noise drawn after it for i > 0. A model
    with a learned variance sets σ_t itself (its values interpolate this schedule's β and β̃, as in improved-diffusion);
    the `variance` option then does not apply."""
    x = walk.x_T
    for i in walk.indices():
        out = yield x, walk.t(i)
        noise = walk.noise() if i > 0 else None
        log_variance = None
        if out.var_values is not None:
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            log_variance = log_variance_from_frac(walk.sched, t, out.var_values)
        x = ddpm_step(walk.sched, out.eps, x, i, noise, walk.options["variance"], walk.options["clip_x0"], out.x0,
                      log_variance)
    return x
