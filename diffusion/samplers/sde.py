"""The score view's stochastic samplers (Song et al. 2021): the reverse-SDE predictor and predictor–corrector with
Langevin dynamics. The network's ε is read as the score s = −ε / √(1 − ᾱ) (diffusion.score)."""

from __future__ import annotations

import math

import torch

from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Steps, Walk, register
from diffusion.schedule import NoiseSchedule
from diffusion.score import langevin_step, score_from_eps


def reverse_sde_step(sched: NoiseSchedule, eps: torch.Tensor, x_t: torch.Tensor, i: int,
                     noise: torch.Tensor | None) -> torch.Tensor:
    """x_{i−1} = (x_i + β_i s(x_i, t_i)) / √(1 − β_i) + √β_i z, z unused at i = 0. All [B, ...].

    The ancestral discretisation of the reverse VP SDE dx = (½x + s) dτ' + dW̄ over one step of length β_i: the
    drift's ½x dτ' becomes the exact 1/√(1 − β_i) rescaling, so its mean coincides with DDPM's μ̃ (eq. 11) and its
    noise with DDPM's "large" variance β_i; Song et al.'s "reverse diffusion" predictor (2 − √(1 − β_i)) x + β_i s
    agrees to first order in β_i. At i = 0 this returns x̂_0.
    """
    beta = float(sched.betas[i])
    mean = (x_t + beta * score_from_eps(sched, eps, i)) / math.sqrt(1.0 - beta)
    if i == 0:
        return mean
    assert noise is not None and noise.shape == x_t.shape, "reverse_sde_step needs noise shaped like x_t for i > 0"
    return mean + math.sqrt(beta) * noise


def corrector_step_size(sched: NoiseSchedule, i: int, snr: float) -> float:
    """δ_i = 2 α_i r² (1 − ᾱ_i): Song et al.'s signal-to-noise rule δ = 2 α (r ‖z‖ / ‖s‖)² (Alg. 5) with both norms at
    their expectations, E‖z‖² = d and E‖s‖² ≈ d / (1 − ᾱ_i) (the score's scale at noise level √(1 − ᾱ_i)).

    The reference implementation averages the two norms over the batch, so a served image's step would depend on the
    other requests in its batch; per example they do not concentrate in low dimension (with d = 4 a small ‖s‖ makes
    δ explode, and the samples' spread comes out half again too wide). The expectations are the same in any
    dimension and for any batch, and equal the norms' own values where they concentrate (images: d in the thousands).
    """
    return 2.0 * float(sched.alphas[i]) * snr**2 * (1.0 - float(sched.alphas_cumprod[i]))


@register(SAMPLER_SPECS["sde"])
def sde(walk: Walk) -> Steps:
    """`reverse_sde_step` on the (possibly respaced) schedule; one model call per step."""
    x = walk.x_T
    for i in walk.indices():
        out = yield x, walk.t(i)
        x = reverse_sde_step(walk.sched, out.eps, x, i, walk.noise() if i > 0 else None)
    return x


@register(SAMPLER_SPECS["pc"])
def pc(walk: Walk) -> Steps:
    """At each noise level i: `corrector_steps` Langevin steps on p_{t_i} with the signal-to-noise step rule, then
    the reverse-SDE predictor to level i − 1. Each corrector step and each predictor step is one model call."""
    x = walk.x_T
    for i in walk.indices():
        for _ in range(walk.options["corrector_steps"]):
            out = yield x, walk.t(i)
            delta = corrector_step_size(walk.sched, i, walk.options["snr"])
            x = langevin_step(x, score_from_eps(walk.sched, out.eps, i), delta, walk.noise())
        out = yield x, walk.t(i)
        x = reverse_sde_step(walk.sched, out.eps, x, i, walk.noise() if i > 0 else None)
    return x
