"""One training step (Ho et al. 2020, Alg. 1, with the objectives of diffusion.objectives): draw t and ε, the loss under
autocast, backward, gradient clipping, the optimizer and LR schedule, the EMA update. Plain torch: the Ray Train loop,
the benchmarks and the tests all call the same step.

The step never waits for the device: t and ε are drawn on it, label dropout happens on it, the schedule is read from
tensors already there (diffusion.schedule), and the metrics it returns are device tensors the caller reduces when it
logs; the importance sampler of t (objective l_vlb, host-side) receives the steps' (t, L_t) in `flush_t_sampler`,
which the caller runs when it syncs anyway (logging, checkpoints). The loss (model call included) is a function of tensors only, so `compile=True` compiles it whole
(`fullgraph=True`: a graph break is an error, not a silent slowdown); the optimizer and EMA stay eager.

    step = TrainingStep(unet, sched, optimizer, ema, StepOptions(objective="l_hybrid", prediction="v",
                        learn_variance=True), compile=True)
    metrics = step(x0, y)                       # x0 [B, C, H, W] on the device, y [B] int64 or None
    metrics["loss"].item()                      # only when logging: the one host sync
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from diffusion.ema import EMA
from diffusion.objectives import (MIN_SNR_GAMMA, ImportanceSampler, LossWeighting, Objective, check_objective,
                                  drop_labels, training_losses)
from diffusion.parameterization import Prediction
from diffusion.schedule import NoiseSchedule

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepOptions:
    """What the step optimizes: the objective and its weighting, the prediction type, label dropout for
    classifier-free guidance (`p_uncond`, conditional models only), gradient clipping, and bf16 autocast."""

    objective: Objective = "l_simple"
    prediction: Prediction = "eps"
    learn_variance: bool = False
    loss_weighting: LossWeighting = "none"
    snr_gamma: float = MIN_SNR_GAMMA
    p_uncond: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = False

    def __post_init__(self) -> None:
        check_objective(self.objective, self.learn_variance, self.loss_weighting)


def loss_terms(model: Callable, sched: NoiseSchedule, options: StepOptions, x0: torch.Tensor, y: torch.Tensor | None,
               t: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None) -> Metrics:
    """The per-example terms of `training_losses` for model(x_t, t[, y]); a function of tensors only (compilable)."""
    call = (lambda x_t, t_in: model(x_t, t_in)) if y is None else (lambda x_t, t_in: model(x_t, t_in, y))
    return training_losses(call, sched, x0, t, noise, weights, options.objective, options.prediction,
                           options.learn_variance, options.loss_weighting, options.snr_gamma)


class TrainingStep:
    """The step over `unet` (parameters, EMA) called through `model` (the same network, or its DDP wrapper)."""

    def __init__(self, unet: torch.nn.Module, sched: NoiseSchedule, optimizer: torch.optim.Optimizer, ema: EMA,
                 options: StepOptions, lr_schedule=None, model: torch.nn.Module | None = None,
                 t_sampler: ImportanceSampler | None = None, compile: bool = False, gather=None):
        self.unet, self.model, self.sched, self.options = unet, model if model is not None else unet, sched, options
        self.optimizer, self.lr_schedule, self.ema, self.t_sampler = optimizer, lr_schedule, ema, t_sampler
        self.gather = gather or (lambda tensor: tensor)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_classes = getattr(getattr(unet, "config", None), "num_classes", None)
        if compile:
            sched.prepare(next(unet.parameters()).device)
        terms = lambda *args: loss_terms(self.model, sched, options, *args)  # noqa: E731
        self.terms = torch.compile(terms, fullgraph=True, dynamic=False) if compile else terms

    def draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """t [B] (uniform, or from the importance sampler) and its weights, on x0's device."""
        if self.t_sampler is not None:
            return self.t_sampler.sample(x0.shape[0], device=x0.device)
        return torch.randint(0, self.sched.num_timesteps, (x0.shape[0],), device=x0.device), None

    def __call__(self, x0: torch.Tensor, y: torch.Tensor | None = None) -> Metrics:
        """One optimizer step on x0 [B, C, H, W] (labels y [B] int64 for a conditional model); → device metrics."""
        if self.num_classes is not None and y is not None:
            y = drop_labels(y, self.num_classes, self.options.p_uncond)
        t, weights = self.draw(x0)
        noise = torch.randn_like(x0)
        autocast = torch.autocast(x0.device.type, dtype=torch.bfloat16) if self.options.bf16 else nullcontext()
        with autocast:
            terms = self.terms(x0, y, t, noise, weights)
        loss = terms["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.options.grad_clip)
        self.optimizer.step()
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        self.ema.update(self.unet)
        if self.t_sampler is not None:
            self.pending.append((t, terms["vb"].detach()))
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(),
                **{name: terms[name].detach().mean() for name in ("mse", "vb") if name in terms}}

    def flush_t_sampler(self) -> None:
        """Hand the (t, L_t) of the steps since the last flush to the importance sampler (a host sync; every rank
        receives every rank's values through `gather`, so their p_t stay equal). A no-op for other objectives."""
        if self.t_sampler is None or not self.pending:
            return
        t, vb = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending = []
        self.t_sampler.update(self.gather(t).cpu(), self.gather(vb).cpu())
