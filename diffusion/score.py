"""The score-based view of the same model (Song et al. 2021): the network's ε is a scaled score, and the forward
process is a discretised variance-preserving (Ornstein–Uhlenbeck) SDE.

    score     s(x, t) = ∇ log p_t(x) = −ε(x, t) / √(1 − ᾱ_t)           (Tweedie; Song et al. eq. 11 / Ho et al. §3.2)
    time      τ_i = Σ_{j ≤ i} β_j for schedule index i (array index 0 is the first noising step), so that
              ᾱ_i = Π (1 − β_j) = e^{−τ_i} (1 + O(Σ β_j²)): in τ every β is 1
    forward   dx = −½ x dτ + dW                                           (VP SDE with β(τ) ≡ 1)
    reverse   dx = (½ x + s(x, τ)) dτ' + dW̄ for τ' = −τ                   (Anderson 1982; diffusion.samplers.sde)
    PF-ODE    dx/dτ = −½ (x + s(x, τ))                                     (same marginals; diffusion.samplers.ode)

`t` below is a schedule index: an int, or an int64 tensor [B] broadcast over x [B, ...].
"""

from __future__ import annotations

import torch

from diffusion.schedule import NoiseSchedule


def _sqrt_one_minus_abar(sched: NoiseSchedule, t: int | torch.Tensor, like: torch.Tensor):
    if isinstance(t, torch.Tensor):
        return sched.to_tensor("sqrt_one_minus_alphas_cumprod", t, like.ndim, like.dtype)
    return float(sched.sqrt_one_minus_alphas_cumprod[t])


def score_from_eps(sched: NoiseSchedule, eps: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """s = −ε / √(1 − ᾱ_t). eps: [B, ...] → [B, ...]."""
    return -eps / _sqrt_one_minus_abar(sched, t, eps)


def eps_from_score(sched: NoiseSchedule, score: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """ε = −√(1 − ᾱ_t) s, the inverse of `score_from_eps`. score: [B, ...] → [B, ...]."""
    return -score * _sqrt_one_minus_abar(sched, t, score)


def langevin_step(x: torch.Tensor, score: torch.Tensor, step_size: float | torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """One unadjusted Langevin step on p_t: x + δ s + √(2δ) z, which leaves p_t invariant as δ → 0.
    x, score, noise: [B, ...]; step_size δ a float or broadcastable to x (e.g. [B, 1, ..., 1])."""
    return x + step_size * score + (2 * step_size) ** 0.5 * noise
