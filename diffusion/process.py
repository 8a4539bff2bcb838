"""The forward process q(x_t | x_0), its posterior q(x_{t−1} | x_t, x_0), and ε ↔ x̂_0 conversions (Ho et al. 2020).

`t` is an int64 tensor [B] of indices into `sched` (for a respaced schedule: its own indices, not the original ones).
"""

from __future__ import annotations

import torch

from diffusion.schedule import NoiseSchedule, work_dtype


def _check(x: torch.Tensor, t: torch.Tensor) -> None:
    assert t.ndim == 1 and t.shape[0] == x.shape[0], f"t must be [B={x.shape[0]}], got {tuple(t.shape)}"
    assert not torch.is_floating_point(t), "t must be an integer tensor"


def q_sample(sched: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε   (eq. 4). x0, noise: [B, ...]; returns [B, ...]."""
    _check(x0, t)
    assert noise.shape == x0.shape
    return (
        sched.to_tensor("sqrt_alphas_cumprod", t, x0.ndim, x0.dtype) * x0
        + sched.to_tensor("sqrt_one_minus_alphas_cumprod", t, x0.ndim, x0.dtype) * noise
    )


def q_posterior(
    sched: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance β̃_t and clipped log-variance of q(x_{t−1} | x_t, x_0)   (eqs. 6–7).

    x0, x_t: [B, ...]. Returns mean [B, ...], variance and log_variance broadcastable as [B, 1, ..., 1].
    """
    _check(x_t, t)
    assert x0.shape == x_t.shape
    mean = (
        sched.to_tensor("posterior_mean_coef1", t, x_t.ndim, x_t.dtype) * x0
        + sched.to_tensor("posterior_mean_coef2", t, x_t.ndim, x_t.dtype) * x_t
    )
    variance = sched.to_tensor("posterior_variance", t, x_t.ndim, x_t.dtype)
    log_variance = sched.to_tensor("posterior_log_variance_clipped", t, x_t.ndim, x_t.dtype)
    return mean, variance, log_variance


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar) -> torch.Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ) ε) / √ᾱ, inverting eq. 4; ᾱ a float or a tensor broadcastable to x_t [B, ...]."""
    return (x_t - (1.0 - abar) ** 0.5 * eps) / abar**0.5


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar) -> torch.Tensor:
    """ε = (x_t − √ᾱ x_0) / √(1 − ᾱ), inverting eq. 4; ᾱ a float or a tensor broadcastable to x_t [B, ...]."""
    return (x_t - abar**0.5 * x0) / (1.0 - abar) ** 0.5


def predict_x0(sched: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 from ε at schedule indices t: [B]; x_t, eps: [B, ...]."""
    _check(x_t, t)
    return x0_from_eps(x_t, eps, sched.to_tensor("alphas_cumprod", t, x_t.ndim, work_dtype(x_t))).to(x_t.dtype)


def predict_eps(sched: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε from x_0 at schedule indices t: [B]; x_t, x0: [B, ...]."""
    _check(x_t, t)
    return eps_from_x0(x_t, x0, sched.to_tensor("alphas_cumprod", t, x_t.ndim, work_dtype(x_t))).to(x_t.dtype)


def model_timesteps(sched: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """Original timestep units the model is conditioned on, for schedule indices t: [B] → [B] int64."""
    return sched.table("timesteps", t.device, torch.long)[t]
