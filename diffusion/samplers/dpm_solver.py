"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): a second-order multistep solver of the
probability-flow ODE in data prediction x̂_0, stepping in log-SNR λ = log(α/σ) with α = √ᾱ, σ = √(1 − ᾱ)."""

from __future__ import annotations

import math

import torch

from diffusion.process import x0_from_eps
from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Steps, Walk, register
from diffusion.schedule import NoiseSchedule, log_snr


def log_snr_step(sched: NoiseSchedule, i: int) -> float:
    """h = λ_{i−1} − λ_i, the log-SNR length of reverse step i (+∞ for the step to ᾱ = 1)."""
    return log_snr(float(sched.alphas_cumprod_prev[i])) - log_snr(float(sched.alphas_cumprod[i]))


def dpmpp_2m_step(sched: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, i: int,
                  x0_last: torch.Tensor | None = None, h_last: float | None = None) -> torch.Tensor:
    """x_{i−1} from x_i [B, ...] and the data prediction x̂_0 at x_i [B, ...].

    1. h = λ_{i−1} − λ_i
    2. D = x̂_0 (first order: the first step, or no history), else, with r = h_last / h,
       D = (1 + 1/(2r)) x̂_0 − (1/(2r)) x̂_0,last   (the previous step's data prediction and log-SNR step h_last)
    3. x_{i−1} = (σ_{i−1} / σ_i) x_i − α_{i−1} (e^{−h} − 1) D;  to σ = 0 (i = 0) this is x̂_0: the lower-order
       final step
    """
    abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
    if abar_prev >= 1.0:
        return x0
    h = log_snr_step(sched, i)
    d = x0
    if x0_last is not None and h_last is not None:
        r = h_last / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_last
    ratio = math.sqrt((1.0 - abar_prev) / (1.0 - abar))
    return ratio * x_t - math.sqrt(abar_prev) * math.expm1(-h) * d


@register(SAMPLER_SPECS["dpmpp-2m"], zero_terminal_snr=True)
def dpmpp_2m(walk: Walk) -> Steps:
    """`dpmpp_2m_step` on the (by default log-SNR-uniform) respaced schedule; one model call per step, carrying the
    last x̂_0 and log-SNR step."""
    x, x0_last, h_last = walk.x_T, None, None
    for i in walk.indices():
        out = yield x, walk.t(i)
        x0 = x0_from_eps(x, out.eps, float(walk.sched.alphas_cumprod[i])) if out.x0 is None else out.x0
        if walk.options["clip_x0"]:
            x0 = x0.clamp(-1.0, 1.0)
        x = dpmpp_2m_step(walk.sched, x0, x, i, x0_last, h_last)
        x0_last, h_last = x0, log_snr_step(walk.sched, i)
    return x
