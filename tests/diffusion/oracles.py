"""Analytic oracles shared by the diffusion tests: the exact ε-predictor for Gaussian data."""

import math

import torch
from torch import nn

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
