"""The score view's stochastic samplers (Song et al. 2021): the reverse-SDE predictor and predictor–corrector with
Langevin dynamics. The network's ε is read as the score s = −ε / √(1 − ᾱ) (diffusion.score)."""

from __future__ import annotations

import math

import torch

from diffusion.guidance import Denoised
from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Sampler, SamplerState, draw_noise
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


def snr_step_size(score: torch.Tensor, noise: torch.Tensor, snr: float, alpha: float) -> torch.Tensor:
    """δ = 2 α (r ‖z‖ / ‖s‖)² per example (Song et al. 2021, Alg. 5), shaped [B, 1, ..., 1] to broadcast over
    score, noise: [B, ...]. Per example rather than per batch, so an image's step never depends on its batch."""
    dims = tuple(range(1, score.ndim))
    ratio = noise.square().sum(dims, keepdim=True) / score.square().sum(dims, keepdim=True).clamp_min(1e-30)
    return 2.0 * alpha * snr**2 * ratio


class ReverseSDE(Sampler):
    """`reverse_sde_step` on the (possibly respaced) schedule; one model call per step."""

    spec = SAMPLER_SPECS["sde"]

    def step(self, state: SamplerState, out: Denoised, generator: torch.Generator | None) -> None:
        noise = draw_noise(state, generator) if state.i > 0 else None
        self.advance(state, reverse_sde_step(state.sched, out.eps, state.x, state.i, noise))


class PredictorCorrector(Sampler):
    """At each noise level i: `corrector_steps` Langevin steps on p_{t_i} with the signal-to-noise step rule, then
    the reverse-SDE predictor to level i − 1. Each corrector step and each predictor step is one model call."""

    spec = SAMPLER_SPECS["pc"]

    def start(self, sched, x_T, steps=None, **options) -> SamplerState:
        state = super().start(sched, x_T, steps, **options)
        state.memory["corrections_left"] = state.options["corrector_steps"]
        return state

    def step(self, state: SamplerState, out: Denoised, generator: torch.Generator | None) -> None:
        if state.memory["corrections_left"] > 0:
            score, noise = score_from_eps(state.sched, out.eps, state.i), draw_noise(state, generator)
            delta = snr_step_size(score, noise, state.options["snr"], float(state.sched.alphas[state.i]))
            state.x, state.nfe = langevin_step(state.x, score, delta, noise), state.nfe + 1
            state.memory["corrections_left"] -= 1
            return
        noise = draw_noise(state, generator) if state.i > 0 else None
        self.advance(state, reverse_sde_step(state.sched, out.eps, state.x, state.i, noise))
        state.memory["corrections_left"] = state.options["corrector_steps"]
