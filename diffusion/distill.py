"""Progressive distillation (Salimans & Ho 2022, Alg. 2): a student that takes one DDIM step (η = 0) where its teacher
takes two, so each round halves the number of steps.

Grid: the teacher walks 2N "trailing" steps of the schedule, the student N (every second one of the teacher's, which
are the N-step trailing grid itself, so a student of N steps samples with `ddim` at N steps, spacing "trailing"):

    student  τ_1 < … < τ_N            (indices of the schedule; τ_N = T − 1)
    teacher  τ_k → m_k → τ_{k−1}      (m_k the teacher's step between them; after τ_1 the clean image, ᾱ = 1)

One DDIM step (η = 0) from z_s to index r, through the prediction x̂ (ε̂ follows from x̂):

    z_r = √ᾱ_r x̂ + √(1 − ᾱ_r) (z_s − √ᾱ_s x̂) / √(1 − ᾱ_s)

The student's target x̃ at z_t (t = τ_k) is the x̂ that takes one such step from z_t to where the teacher's two steps
land (z'' at τ_{k−1}); solving the step for x̂:

    x̃ = (z'' − r z_t) / (√ᾱ_{t''} − r √ᾱ_t),   r = √(1 − ᾱ_{t''}) / √(1 − ᾱ_t)      (x̃ = z'' when ᾱ_{t''} = 1)

The loss is the student's x-space error weighted by truncated SNR, max(SNR_t, 1) (the paper's choice, §4: the x̂_0
error at high noise still counts). The student predicts v (Salimans & Ho §4: ε-prediction cannot take a step from
pure noise), whatever the teacher predicts.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from diffusion.schedule import NoiseSchedule, spaced_timesteps, work_dtype

X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z [B, ...], schedule indices t [B]) → x̂_0


def distillation_grid(num_timesteps: int, student_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(student indices τ_1..τ_N, the teacher's intermediate indices m_1..m_N), both [N] ascending int64."""
    if student_steps < 1 or 2 * student_steps > num_timesteps:
        raise ValueError(f"student_steps must be in [1, {num_timesteps // 2}] (the teacher takes twice as many "
                         f"steps of the {num_timesteps}-step schedule), got {student_steps}")
    teacher = spaced_timesteps(num_timesteps, 2 * student_steps, "trailing")
    return teacher[1::2], teacher[0::2]


def _abar(sched: NoiseSchedule, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ at schedule indices [B] (−1 = the clean image, ᾱ = 1) as [B, 1, …] in the work dtype of `like`."""
    table = sched.table("alphas_cumprod", like.device, work_dtype(like))
    abar = torch.where(index >= 0, table[index.clamp(min=0)], torch.ones((), dtype=table.dtype, device=table.device))
    return abar.reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step(z: torch.Tensor, x0: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from z (at ᾱ_from) through the prediction x0 to ᾱ_to; all broadcast to z."""
    eps = (z - abar_from.sqrt() * x0) / (1.0 - abar_from).sqrt()
    return abar_to.sqrt() * x0 + (1.0 - abar_to).sqrt() * eps


def target_x0(z_t: torch.Tensor, z_next: torch.Tensor, abar_t: torch.Tensor, abar_next: torch.Tensor) -> torch.Tensor:
    """The x̂ whose DDIM step from z_t (ᾱ_t) lands on z_next (ᾱ_next): the student's target (module docstring)."""
    ratio = (1.0 - abar_next).sqrt() / (1.0 - abar_t).sqrt()
    return (z_next - ratio * z_t) / (abar_next.sqrt() - ratio * abar_t.sqrt())


@torch.no_grad()
def teacher_targets(teacher: X0Model, sched: NoiseSchedule, student_steps: int, z_t: torch.Tensor,
                    k: torch.Tensor) -> torch.Tensor:
    """x̃ for noisy images z_t at the student's grid positions k [B] (0-based: τ_{k+1}), from two teacher steps."""
    student, middle = (torch.as_tensor(a, device=z_t.device) for a in distillation_grid(sched.num_timesteps,
                                                                                        student_steps))
    t, m = student[k], middle[k]
    after = torch.where(k > 0, student[(k - 1).clamp(min=0)], torch.full_like(k, -1))
    abar_t, abar_m, abar_next = (_abar(sched, index, z_t) for index in (t, m, after))
    z_m = ddim_step(z_t, teacher(z_t, t), abar_t, abar_m)
    z_next = ddim_step(z_m, teacher(z_m, m), abar_m, abar_next)
    return target_x0(z_t, z_next, abar_t, abar_next)


def distillation_loss(student_x0: torch.Tensor, target: torch.Tensor, sched: NoiseSchedule,
                      t: torch.Tensor) -> torch.Tensor:
    """Per-example max(SNR_t, 1) · ‖x̃ − x̂_student‖² / D → [B] (truncated-SNR weighting, Salimans & Ho §4)."""
    snr = sched.to_tensor("signal_to_noise", t, 1, work_dtype(student_x0))
    error = (student_x0.to(snr.dtype) - target.to(snr.dtype)).pow(2).reshape(t.shape[0], -1).mean(dim=1)
    return torch.clamp(snr, min=1.0) * error
