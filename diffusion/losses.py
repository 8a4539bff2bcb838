"""Training loss L_simple and the variational bound in bits/dim (Ho et al. 2020, eqs. 5 and 14).

Data are 8-bit images scaled to [−1, 1]: x = u / 127.5 − 1 for u ∈ {0, …, 255}, so one quantization bin is 2/255 wide.
Bits/dim = nats / (D · ln 2), D = C·H·W; every term here is already averaged over dimensions, per example.
The bound reads any model output through diffusion.parameterization (prediction type eps/x0/v, learned Σ_θ);
the training objectives built on these terms are in diffusion.objectives.
"""

from __future__ import annotations

import math
import torch

from diffusion.parameterization import Prediction, Variance, fixed_log_variance, model_prediction
from diffusion.process import model_timesteps, q_posterior, q_sample
from diffusion.schedule import NoiseSchedule, work_dtype

LN2 = math.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: [B, ...] → [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def widen(x: torch.Tensor) -> torch.Tensor:
    """x in the precision losses are computed in (diffusion.schedule.work_dtype)."""
    return x.to(work_dtype(x))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats (all arguments broadcast)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element under N(mean, e^{2·log_scale}) integrated over x's 8-bit bin (eq. 13).

    Bins are [x − 1/255, x + 1/255], open-ended at x = −1 (from −∞) and x = 1 (to +∞). x: [B, ...] in [−1, 1].
    Uses log Φ directly (torch.special.log_ndtr) so tails keep their precision.
    """
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + BIN_HALF_WIDTH) * inv_std
    lower = (x - mean - BIN_HALF_WIDTH) * inv_std
    # Mass of an inner bin, Φ(a) − Φ(b) with a > b; right of the mean the mirrored Φ(−l) − Φ(−u) keeps precision.
    right = x > mean
    a = torch.where(right, -lower, upper)
    b = torch.where(right, -upper, lower)
    log_a = torch.special.log_ndtr(a)
    log_inner = log_a + torch.log(-torch.expm1(torch.clamp(torch.special.log_ndtr(b) - log_a, max=-1e-30)))
    log_left_edge = torch.special.log_ndtr(upper)  # x = −1: P(X ≤ −1 + 1/255)
    log_right_edge = torch.special.log_ndtr(-lower)  # x = +1: P(X ≥ 1 − 1/255)
    return torch.where(x < -0.999, log_left_edge, torch.where(x > 0.999, log_right_edge, log_inner))


def l_simple(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """E_{t, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²   (eq. 14), t uniform over the schedule. x0: [B, C, H, W] → scalar.
    The same value as `diffusion.objectives.training_losses` at its defaults (objective l_simple, ε-prediction)."""
    if t is None:
        t = torch.randint(0, sched.num_timesteps, (x0.shape[0],), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    eps = model(q_sample(sched, x0, t, noise), model_timesteps(sched, t))
    assert eps.shape == x0.shape, f"model output {tuple(eps.shape)} does not match x0 {tuple(x0.shape)}"
    return mean_flat((widen(eps) - widen(noise)) ** 2).mean()


def prior_bpd(sched: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim. x0: [B, ...] → [B]."""
    t = torch.full((x0.shape[0],), sched.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean = sched.to_tensor("sqrt_alphas_cumprod", t, x0.ndim, x0.dtype) * x0
    logvar = sched.to_tensor("log_one_minus_alphas_cumprod", t, x0.ndim, x0.dtype)
    return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))) / LN2


def vlb_term(
    sched: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_mean: torch.Tensor,
    model_log_variance: torch.Tensor,
) -> torch.Tensor:
    """The bound's term at index t for a given p_θ(x_{t−1} | x_t) = N(model_mean, e^model_log_variance), in bits/dim → [B].

    t ≥ 1: L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))      (eq. 5)
    t = 0: L_0 = −log p_θ(x_0 | x_1), the discretized Gaussian decoder  (eq. 13)

    x0, x_t, model_mean: [B, C, H, W]; t: [B]; model_log_variance: [B, C, H, W] (learned Σ_θ) or [B, 1, 1, 1] (fixed).
    Differentiable in model_mean and model_log_variance (for L_hybrid and L_vlb training).
    """
    true_mean, _, true_logvar = q_posterior(sched, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_log_variance)) / LN2
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)) / LN2
    return torch.where(t == 0, decoder_nll, kl)


@torch.no_grad()
def vlb_terms(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    variance: Variance = "small",
    clip_x0: bool = False,
    prediction: Prediction = "eps",
    learn_variance: bool = False,
) -> torch.Tensor:
    """One Monte-Carlo sample of the bound's term at index t (see `vlb_term`), per example, in bits/dim → [B].

    The model's output is read as `prediction` (diffusion.parameterization); with learn_variance its Σ_θ replaces
    the fixed `variance`.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(sched, x0, t, noise)
    output = model(x_t, model_timesteps(sched, t))
    pred = model_prediction(sched, x_t, t, output, prediction, learn_variance)
    x0_hat = pred.x0.clamp(-1, 1) if clip_x0 else pred.x0
    model_mean, _, _ = q_posterior(sched, x0_hat, x_t, t)
    if pred.log_variance is None:
        model_logvar = fixed_log_variance(sched, t, x0.ndim, variance, work_dtype(x0))
    else:
        model_logvar = pred.log_variance.to(x0.dtype)
    return vlb_term(sched, x0, x_t, t, model_mean, model_logvar)


@torch.no_grad()
def nll_bpd(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    x0: torch.Tensor,
    variance: Variance = "small",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress=None,
    prediction: Prediction = "eps",
    learn_variance: bool = False,
) -> dict[str, torch.Tensor]:
    """The full bound L_T + Σ_{t≥2} L_{t−1} + L_0 in bits/dim, one noise sample per term. x0: [B, C, H, W] in [−1, 1].

    The model's output is read as `prediction`; with learn_variance (2C output channels) every term uses its
    learned Σ_θ and `variance` is unused. Returns per-example tensors: total_bpd [B], prior_bpd [B] (L_T),
    vb_bpd [B] (Σ of the KL terms), decoder_bpd [B] (L_0), and vb_per_t [B, T] (index 0 holds L_0, index i ≥ 1
    the KL term L_i).
    """
    num_steps = sched.num_timesteps
    vb_per_t = torch.zeros(x0.shape[0], num_steps, dtype=torch.float64, device=x0.device)
    for i in reversed(range(num_steps)):
        t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        vb_per_t[:, i] = vlb_terms(model, sched, x0, t, noise, variance, clip_x0, prediction, learn_variance).double()
        if progress is not None:
            progress(num_steps - i, num_steps)
    prior = prior_bpd(sched, x0).double()
    decoder = vb_per_t[:, 0]
    vb = vb_per_t[:, 1:].sum(dim=1)
    return {
        "total_bpd": prior + vb + decoder,
        "prior_bpd": prior,
        "vb_bpd": vb,
        "decoder_bpd": decoder,
        "vb_per_t": vb_per_t,
    }
