"""Training objectives beyond L_simple: L_hybrid and L_vlb with a learned variance and importance-sampled t
(Nichol & Dhariwal 2021, "Improved DDPM"), min-SNR-γ loss weighting (Hang et al. 2023) and label dropout for
classifier-free guidance. (The zero-terminal-SNR schedule transform is in diffusion.schedule.)

One training step (t from the sampler, or uniform when `t` is None):

    t, w = sampler.sample(B, generator)                       # ImportanceSampler, only for objective "l_vlb"
    terms = training_losses(model, sched, x0, t, weights=w, objective="l_vlb", prediction="v", learn_variance=True)
    terms["loss"].mean().backward()                           # loss [B]; also mse [B] and vb [B] when computed
    sampler.update(t, terms["vb"].detach())

Objectives, per example at one t (uniform, or with importance weights w = 1/(T p_t) multiplying the whole loss):

    l_simple  w_snr · ‖target − f_θ‖² / D                    target ε, x_0 or v by prediction type (Ho et al. eq. 14)
    l_hybrid  l_simple + λ · T · L_t   with the mean stop-gradiented inside L_t, λ = 0.001   (Improved DDPM §3.1)
    l_vlb     T · L_t                  L_t in bits/dim: the KL term L_{t−1} or the decoder L_0 (diffusion.losses.vlb_term)

T · L_t is the one-sample estimate of L_vlb = Σ_t L_t without the parameter-free prior L_T (improved-diffusion's
"vb · num_timesteps / 1000" for the hybrid loss is the same λ · T · L_t). Learning the variance (2C output channels,
see diffusion.parameterization) needs l_hybrid or l_vlb, since l_simple gives the variance half no gradient.

min-SNR-γ weights w_snr, SNR_t = ᾱ_t / (1 − ᾱ_t): every prediction type then weighs ‖x_0 − x̂_0‖² by min(SNR_t, γ)
(‖ε − ε̂‖² = SNR ‖x_0 − x̂_0‖², ‖v − v̂‖² = (SNR + 1) ‖x_0 − x̂_0‖²):

    eps  min(SNR, γ) / SNR       x0  min(SNR, γ)       v  min(SNR, γ) / (SNR + 1)
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from diffusion.losses import mean_flat, vlb_term, widen
from diffusion.parameterization import (Prediction, Variance, check_prediction, fixed_log_variance, model_prediction,
                                        prediction_target, split_output)
from diffusion.process import model_timesteps, q_posterior, q_sample
from diffusion.schedule import NoiseSchedule, snr, work_dtype

Objective = Literal["l_simple", "l_hybrid", "l_vlb"]
LossWeighting = Literal["none", "min_snr"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
HYBRID_LAMBDA = 0.001
MIN_SNR_GAMMA = 5.0


def min_snr_weight(sched: NoiseSchedule, t: torch.Tensor, prediction: Prediction,
                   gamma: float = MIN_SNR_GAMMA, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The min-SNR-γ weight of the `prediction`-space squared error (Hang et al. 2023, eq. 9 and §3.4). t: [B] → [B]
    in `dtype`. At SNR = 0 (zero-terminal SNR) the ε weight is its limit 1."""
    check_prediction(prediction)
    s = snr(sched, t, dtype)
    clipped = torch.clamp(s, max=gamma)
    if prediction == "eps":
        return torch.clamp(gamma / s, max=1.0)  # = min(SNR, γ) / SNR, finite at SNR = 0
    if prediction == "x0":
        return clipped
    return clipped / (s + 1.0)


class ImportanceSampler:
    """Importance sampling of t for L_vlb (Improved DDPM §3.3): p_t ∝ √E[L_t²] over the last `history` values of
    each L_t, mixed with `uniform_prob` of the uniform distribution; uniform until every t has `history` values.

    `sample` returns t: [B] int64 and weights 1/(T p_t): [B], so E_{t∼p}[w_t · T · L_t] = Σ_t L_t (unbiased).
    `update(t, losses)` records per-example L_t (bits/dim) at t. `state_dict`/`load_state_dict` go in checkpoints.
    With several data-parallel workers, update every worker with the gathered (t, losses) so their p_t agree.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        if num_timesteps < 1 or history < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"bad ImportanceSampler({num_timesteps}, {history}, {uniform_prob})")
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self._losses = np.zeros((num_timesteps, history), dtype=np.float64)  # ring buffer, newest last once full
        self._counts = np.zeros(num_timesteps, dtype=np.int64)

    @property
    def warmed_up(self) -> bool:
        return bool(np.all(self._counts == self.history))

    def probabilities(self) -> np.ndarray:
        """p_t: [T] float64, summing to 1."""
        T = self.num_timesteps
        if not self.warmed_up:
            return np.full(T, 1.0 / T)
        p = np.sqrt(np.mean(self._losses**2, axis=1))
        if p.sum() <= 0:
            return np.full(T, 1.0 / T)
        return p / p.sum() * (1.0 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw t ~ p: [B] int64 and the weights 1/(T p_t): [B] (`generator` on the CPU; results moved to `device`)."""
        p = torch.from_numpy(self.probabilities()).to(dtype)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record losses: [B] (each example's L_t) at t: [B]."""
        assert t.shape == losses.shape and t.ndim == 1, f"t {tuple(t.shape)} and losses {tuple(losses.shape)}"
        for step, loss in zip(t.tolist(), losses.detach().double().tolist()):
            if self._counts[step] == self.history:
                self._losses[step, :-1] = self._losses[step, 1:]
                self._losses[step, -1] = loss
            else:
                self._losses[step, self._counts[step]] = loss
                self._counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": torch.from_numpy(self._losses.copy()), "counts": torch.from_numpy(self._counts.copy()),
                "uniform_prob": self.uniform_prob}

    def load_state_dict(self, state: dict) -> None:
        losses, counts = state["losses"].double().numpy(), state["counts"].long().numpy()
        if losses.shape != self._losses.shape:
            raise ValueError(f"sampler state for {losses.shape} (T, history), this sampler is {self._losses.shape}")
        self._losses, self._counts = losses.copy(), counts.copy()
        self.uniform_prob = float(state["uniform_prob"])


def check_objective(objective: str, learn_variance: bool, loss_weighting: str) -> None:
    """Fail on combinations that train nothing or mean nothing."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {list(OBJECTIVES)}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected one of {list(LOSS_WEIGHTINGS)}")
    if objective == "l_simple" and learn_variance:
        raise ValueError("learn_variance needs objective l_hybrid or l_vlb: l_simple gives the variance no gradient")
    if objective == "l_hybrid" and not learn_variance:
        raise ValueError("l_hybrid needs learn_variance: with a fixed variance its L_vlb part has no gradient")
    if objective == "l_vlb" and loss_weighting != "none":
        raise ValueError("loss_weighting applies to the squared error of l_simple/l_hybrid, not to l_vlb")


def training_losses(
    model: torch.nn.Module,
    sched: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    objective: Objective = "l_simple",
    prediction: Prediction = "eps",
    learn_variance: bool = False,
    loss_weighting: LossWeighting = "none",
    snr_gamma: float = MIN_SNR_GAMMA,
    hybrid_lambda: float = HYBRID_LAMBDA,
    variance: Variance = "small",
) -> dict[str, torch.Tensor]:
    """Per-example training loss of `objective` (module docstring) at x_t = q_sample(sched, x0, t, noise).

    x0: [B, C, H, W]; t: [B] int64 indices (uniform if None); noise: [B, C, H, W] (drawn if None); weights: [B]
    importance weights (from ImportanceSampler.sample) or None. The model is called as model(x_t, t_original) and
    returns [B, C, H, W], or [B, 2C, H, W] with learn_variance. `variance` is the fixed Σ of l_vlb without
    learn_variance. Returns float32 (float64 for float64 x0) tensors [B]: "loss" (to average and backpropagate),
    "mse" (the unweighted squared error of l_simple/l_hybrid) and "vb" (L_t in bits/dim, for l_hybrid/l_vlb).
    """
    check_prediction(prediction)
    check_objective(objective, learn_variance, loss_weighting)
    if t is None:
        t = torch.randint(0, sched.num_timesteps, (x0.shape[0],), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(sched, x0, t, noise)
    output = model(x_t, model_timesteps(sched, t))
    mean_output, var_output = split_output(output, learn_variance)
    assert mean_output.shape == x0.shape, f"model output {tuple(output.shape)} does not match x0 {tuple(x0.shape)}"
    terms: dict[str, torch.Tensor] = {}
    loss = torch.zeros(x0.shape[0], dtype=widen(x0).dtype, device=x0.device)
    if objective != "l_vlb":
        target = prediction_target(prediction, sched, x0, noise, t)
        terms["mse"] = mean_flat((widen(mean_output) - widen(target)) ** 2)
        snr_weight = 1.0 if loss_weighting == "none" else min_snr_weight(sched, t, prediction, snr_gamma, loss.dtype)
        loss = loss + snr_weight * terms["mse"]
    if objective != "l_simple":
        if objective == "l_hybrid":  # L_vlb trains the variance only (Improved DDPM §3.1)
            mean_output = mean_output.detach()
        frozen = mean_output if var_output is None else torch.cat([mean_output, var_output], dim=1)
        pred = model_prediction(sched, x_t, t, frozen, prediction, learn_variance)
        model_mean, _, _ = q_posterior(sched, pred.x0, x_t, t)
        if pred.log_variance is None:
            log_variance = fixed_log_variance(sched, t, x0.ndim, variance, work_dtype(x0))
        else:
            log_variance = pred.log_variance
        terms["vb"] = widen(vlb_term(sched, x0, x_t, t, model_mean, log_variance))
        scale = sched.num_timesteps * (hybrid_lambda if objective == "l_hybrid" else 1.0)
        loss = loss + scale * terms["vb"]
    terms["loss"] = loss if weights is None else loss * weights.to(loss.dtype)
    return terms


def drop_labels(y: torch.Tensor, num_classes: int, p_uncond: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Training labels for classifier-free guidance: each of y: [B] int64 replaced by the null class (num_classes)
    with probability p_uncond, independently. → [B] int64 (a new tensor)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, num_classes), y)
