"""The probability-flow ODE (Song et al. 2021, eq. 13), solved in the variables of Karras et al. 2022:
x̃ = x / √ᾱ and σ = √(1 − ᾱ) / √ᾱ, in which dx/dτ = −½ (x + s) becomes dx̃/dσ = ε(x, t). Same trajectories, but
nearly straight ones, so Euler is DDIM at η = 0 and Heun is second order."""

from __future__ import annotations

import math

import torch

from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Steps, Walk, register
from diffusion.schedule import NoiseSchedule


def ode_sigmas(sched: NoiseSchedule, i: int) -> tuple[float, float]:
    """(σ at index i, σ at its target i − 1, which is 0 for i = 0) with σ = √(1 − ᾱ)/√ᾱ."""
    abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
    return math.sqrt((1.0 - abar) / abar), math.sqrt((1.0 - abar_prev) / abar_prev)


def ode_euler_step(sched: NoiseSchedule, eps: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
    """x_{i−1} = √ᾱ_{i−1} (x̃_i + (σ_{i−1} − σ_i) ε), x̃_i = x_i / √ᾱ_i. All [B, ...]."""
    abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
    sigma, sigma_prev = ode_sigmas(sched, i)
    return math.sqrt(abar_prev) * (x_t / math.sqrt(abar) + (sigma_prev - sigma) * eps)


def ode_heun_step(sched: NoiseSchedule, eps: torch.Tensor, eps_next: torch.Tensor, x_t: torch.Tensor,
                  i: int) -> torch.Tensor:
    """Heun's correction: x_{i−1} = √ᾱ_{i−1} (x̃_i + (σ_{i−1} − σ_i) (ε_i + ε'_{i−1}) / 2), where ε'_{i−1} is the
    model at the Euler proposal `ode_euler_step(..., eps, x_t, i)` and t_{i−1}. All [B, ...]."""
    return ode_euler_step(sched, 0.5 * (eps + eps_next), x_t, i)


@register(SAMPLER_SPECS["ode-euler"])
def ode_euler(walk: Walk) -> Steps:
    """`ode_euler_step` on the (possibly respaced) schedule; one model call per step."""
    x = walk.x_T
    for i in walk.indices():
        out = yield x, walk.t(i)
        x = ode_euler_step(walk.sched, out.eps, x, i)
    return x


@register(SAMPLER_SPECS["ode-heun"])
def ode_heun(walk: Walk) -> Steps:
    """Heun's method (Karras et al. 2022, Alg. 1): ε at x_i, an Euler proposal, ε again at the proposal, the
    averaged step; 2 model calls per step except the last (to σ = 0), which stays Euler."""
    x = walk.x_T
    for i in walk.indices():
        out = yield x, walk.t(i)
        if i == 0:
            return ode_euler_step(walk.sched, out.eps, x, i)
        proposal = ode_euler_step(walk.sched, out.eps, x, i)
        out_next = yield proposal, walk.t(i - 1)
        x = ode_heun_step(walk.sched, out.eps, out_next.eps, x, i)
    return x
