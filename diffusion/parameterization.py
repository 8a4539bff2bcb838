"""What a network predicts, and the one place its output becomes (ε̂, x̂_0, log Σ_θ); every choice of the
reverse-process variance (fixed β̃ or β, or learned Σ_θ) is made here.

Prediction types (x_t = a x_0 + b ε with a = √ᾱ_t, b = √(1 − ᾱ_t), eq. 4 of Ho et al. 2020):

    eps  ε̂                                   (Ho et al. 2020)
    x0   x̂_0
    v    v = a ε − b x_0                      (Salimans & Ho 2022, §4)
         ⇒ ε = a v + b x_t,  x_0 = a x_t − b v  (a² + b² = 1; no division, so v stays defined at ᾱ = 0)

With `learn_variance` the network has 2C output channels: the first C are the prediction above, the last C a value
v_Σ ∈ [−1, 1] (roughly; it is not clipped) that interpolates the log-variance of p_θ(x_{t−1} | x_t) between the two
fixed choices (Nichol & Dhariwal 2021, eq. 15):

    log Σ_θ = frac · log β_t + (1 − frac) · log β̃_t,   frac = (v_Σ + 1) / 2,   log β̃ clipped at t = 0 as in the schedule

Every function takes schedule indices t: [B] int64 of `sched` (for a respaced schedule its own indices; ᾱ at index i
equals ᾱ at the original step, so ε̂ and x̂_0 are the same, while Σ_θ interpolates the respaced β and β̃, as in
improved-diffusion). Tensors are [B, C, H, W] (any [B, C, ...] works); the arithmetic runs in the schedule's
`work_dtype` (float32, float64 only for float64 inputs): ε̂ and x̂_0 are cast back to x_t's dtype, log Σ_θ stays in
the work dtype, so under bf16 autocast the learned variance is not quantized to bf16.

Typical use:

    out = model(x_t, model_timesteps(sched, t))                          # [B, C or 2C, H, W]
    pred = model_prediction(sched, x_t, t, out, prediction="v", learn_variance=True)
    pred.eps, pred.x0, pred.log_variance                                 # [B, C, H, W] each (log_variance None if fixed)
    target = prediction_target("v", sched, x0, noise, t)                 # what the first C channels regress onto
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from diffusion.process import eps_from_x0, x0_from_eps
from diffusion.schedule import NoiseSchedule, work_dtype

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
Variance = Literal["small", "large"]


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {list(PREDICTIONS)}")


def v_from_eps_x0(eps: torch.Tensor, x0: torch.Tensor, abar) -> torch.Tensor:
    """v = √ᾱ ε − √(1 − ᾱ) x_0; ᾱ a float or a tensor broadcastable to eps [B, ...]."""
    return abar**0.5 * eps - (1.0 - abar) ** 0.5 * x0


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, abar) -> torch.Tensor:
    """ε = √ᾱ v + √(1 − ᾱ) x_t; ᾱ a float or a tensor broadcastable to x_t [B, ...]."""
    return abar**0.5 * v + (1.0 - abar) ** 0.5 * x_t


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, abar) -> torch.Tensor:
    """x_0 = √ᾱ x_t − √(1 − ᾱ) v; ᾱ a float or a tensor broadcastable to x_t [B, ...]."""
    return abar**0.5 * x_t - (1.0 - abar) ** 0.5 * v


def _abar(sched: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    assert t.ndim == 1 and t.shape[0] == like.shape[0], f"t must be [B={like.shape[0]}], got {tuple(t.shape)}"
    assert not torch.is_floating_point(t), "t must be an integer tensor"
    return sched.to_tensor("alphas_cumprod", t, like.ndim, work_dtype(like))


def prediction_target(prediction: Prediction, sched: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    """What a `prediction` network should output at x_t = q_sample(sched, x0, t, noise): noise, x0 or v.

    x0, noise: [B, C, H, W]; t: [B] → [B, C, H, W] in x0's dtype. Also the exact output that encodes a given (ε, x_0).
    """
    check_prediction(prediction)
    assert noise.shape == x0.shape
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return v_from_eps_x0(noise, x0, _abar(sched, t, x0)).to(x0.dtype)


def fixed_variance(sched: NoiseSchedule, i: int, variance: Variance) -> float:
    """σ_i² of the reverse process with a fixed variance at schedule index i: "small" β̃_i or "large" β_i."""
    if variance == "small":
        return float(sched.posterior_variance[i])
    if variance == "large":
        return float(sched.betas[i])
    raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")


def fixed_log_variance(sched: NoiseSchedule, t: torch.Tensor, ndim: int, variance: Variance,
                       dtype=torch.float32) -> torch.Tensor:
    """log σ_t² of the reverse process: 'small' β̃_t (clipped at t=0) or 'large' β_t (β̃_1 at t=0). → [B, 1, ..., 1]."""
    log_small = sched.to_tensor("posterior_log_variance_clipped", t, ndim, dtype)
    if variance == "small":
        return log_small
    if variance == "large":
        log_beta = sched.to_tensor("log_betas", t, ndim, dtype)
        return torch.where(t.reshape(log_beta.shape) == 0, log_small, log_beta)
    raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")


def log_variance_from_frac(sched: NoiseSchedule, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log Σ_θ = frac log β_t + (1 − frac) log β̃_t (clipped), frac = (v + 1)/2   (eq. 15). v: [B, ...] → [B, ...]
    in the work dtype (float32 for a bf16 v, whose one-ulp steps are coarser than log β_t − log β̃_t)."""
    dtype = work_dtype(v)
    frac = (v.to(dtype) + 1.0) / 2.0
    log_small = sched.to_tensor("posterior_log_variance_clipped", t, v.ndim, dtype)
    log_large = sched.to_tensor("log_betas", t, v.ndim, dtype)
    return frac * log_large + (1.0 - frac) * log_small


@dataclass(frozen=True)
class ModelPrediction:
    """eps ε̂ [B, C, H, W]; x0 x̂_0 [B, C, H, W] (unclipped); log_variance log Σ_θ [B, C, H, W], None without
    `learn_variance` (then the caller's fixed β̃ or β applies)."""

    eps: torch.Tensor
    x0: torch.Tensor
    log_variance: torch.Tensor | None


def split_output(output: torch.Tensor, learn_variance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, C, ...] → (prediction, None), or with learn_variance [B, 2C, ...] → (prediction [B, C, ...], v_Σ [B, C, ...])."""
    if not learn_variance:
        return output, None
    assert output.shape[1] % 2 == 0, f"learn_variance needs an even channel count, got {tuple(output.shape)}"
    return output.chunk(2, dim=1)


def model_prediction(sched: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
                     prediction: Prediction = "eps", learn_variance: bool = False) -> ModelPrediction:
    """Turn a network output into ε̂, x̂_0 and (with learn_variance) log Σ_θ.

    x_t: [B, C, H, W]; t: [B] int64 indices of `sched`; output: [B, C, H, W], or [B, 2C, H, W] with learn_variance.
    With prediction "eps" at ᾱ_t = 0 (a zero-terminal-SNR schedule's last step) x̂_0 is undefined (inf/nan); use "v".
    """
    check_prediction(prediction)
    pred, var_values = split_output(output, learn_variance)
    assert pred.shape == x_t.shape, f"model output {tuple(output.shape)} does not match x_t {tuple(x_t.shape)}" + (
        " (learn_variance expects 2C channels)" if learn_variance else "")
    abar = _abar(sched, t, x_t)
    if prediction == "eps":
        eps, x0 = pred, x0_from_eps(x_t, pred, abar)
    elif prediction == "x0":
        eps, x0 = eps_from_x0(x_t, pred, abar), pred
    else:
        eps, x0 = eps_from_v(x_t, pred, abar), x0_from_v(x_t, pred, abar)
    log_variance = None if var_values is None else log_variance_from_frac(sched, t, var_values)
    return ModelPrediction(eps=eps.to(x_t.dtype), x0=x0.to(x_t.dtype), log_variance=log_variance)
