"""Analytic oracles and helpers shared by the diffusion tests: the exact ε-predictor for Gaussian data, any network
read as an ε-model, the inverse of the learned-variance interpolation, and the VP SDE's time."""

import math

import numpy as np
import torch
from torch import nn

from diffusion.parameterization import Prediction, check_prediction, model_prediction
from diffusion.schedule import NoiseSchedule


class GaussianOracle(nn.Module):
    """Optimal ε̂(x_t, t) = E[ε | x_t] for data x_0 ~ N(μ, s²) per dimension, under the ORIGINAL schedule.

    x_t = a x_0 + b ε with a = √ᾱ_t, b = √(1 − ᾱ_t)  ⇒  E[ε | x_t] = b (x_t − a μ) / (a² s² + b²).
    """

    def __init__(self, sched: NoiseSchedule, mu: float, s: float):
        super().__init__()
        self.abar = torch.tensor(sched.alphas_cumprod)
        self.mu, self.s = mu, s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        a, b = abar.sqrt(), (1 - abar).sqrt()
        return (b * (x.double() - a * self.mu) / (a * a * self.s**2 + b * b)).to(x.dtype)


class ConstantEps(nn.Module):
    """A model whose ε̂ is a fixed tensor: the DDIM ODE path is then straight and inversion exact."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps.expand_as(x)


def discretized_gaussian_probs(mu: float, s: float) -> torch.Tensor:
    """P(u) for u = 0..255 when x = u/127.5 − 1 is N(μ, s²) rounded to its bin (open-ended at the extremes). → [256]."""
    edges = torch.linspace(-1, 1, 256, dtype=torch.float64)[:-1] + 1 / 255
    cdf = 0.5 * (1 + torch.erf((edges - mu) / (s * math.sqrt(2))))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf, torch.ones(1, dtype=torch.float64)])
    return cdf[1:] - cdf[:-1]


def sde_time(sched: NoiseSchedule) -> np.ndarray:
    """τ_i = Σ_{j ≤ i} β_j, float64 [T]: the VP SDE's time at each schedule index (ᾱ_i ≈ e^{−τ_i})."""
    return np.cumsum(sched.betas)


def frac_from_log_variance(sched: NoiseSchedule, t: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """The variance channel v that gives `log_variance` (inverse of `log_variance_from_frac`). [B, ...] → [B, ...]."""
    log_small = sched.to_tensor("posterior_log_variance_clipped", t, log_variance.ndim, torch.float64)
    log_large = torch.log(sched.to_tensor("betas", t, log_variance.ndim, torch.float64))
    frac = (log_variance.double() - log_small) / (log_large - log_small)
    return (2.0 * frac - 1.0).to(log_variance.dtype)


class EpsModel(nn.Module):
    """Any network seen as an ε-model: `EpsModel(net, sched, prediction, learn_variance)(x_t, t, *args) -> ε̂`, with
    `sched` the network's original training schedule and t: [B] int64 original timesteps."""

    def __init__(self, net: nn.Module, sched: NoiseSchedule, prediction: Prediction = "eps",
                 learn_variance: bool = False):
        super().__init__()
        check_prediction(prediction)
        if sched.timesteps[-1] != sched.num_timesteps - 1:
            raise ValueError("EpsModel needs the network's original (not respaced) schedule")
        self.net, self.sched = net, sched
        self.prediction, self.learn_variance = prediction, learn_variance

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self.net(x_t, t, *args, **kwargs)
        return model_prediction(self.sched, x_t, t, output, self.prediction, self.learn_variance).eps
