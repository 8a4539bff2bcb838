"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2): the step function and its `Sampler`."""

from __future__ import annotations

import math
from typing import Literal

import torch

from diffusion.process import x0_from_eps
from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Sampler, SamplerState, draw_noise
from diffusion.schedule import NoiseSchedule


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
    x0 = x0_from_eps(x_t, eps, float(sched.alphas_cumprod[i]))
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


class DDPM(Sampler):
    """Alg. 2 on the (possibly respaced) schedule; one model call per step, noise drawn after it for i > 0."""

    spec = SAMPLER_SPECS["ddpm"]

    def step(self, state: SamplerState, eps: torch.Tensor, generator: torch.Generator | None) -> None:
        noise = draw_noise(state, generator) if state.i > 0 else None
        self.advance(state, ddpm_step(state.sched, eps, state.x, state.i, noise, state.options["variance"],
                                      state.options["clip_x0"]))
