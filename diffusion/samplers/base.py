"""What every sampler is: a catalog entry plus `start` / `model_input` / `step`, so a caller can advance any sampler
one model call at a time (the serving engine batches many trajectories into each call) without branching on its name.

    state = sampler.start(sched, x_T, steps, **options)
    while not state.done:
        x, t = sampler.model_input(state)          # where and when the model is evaluated next
        sampler.step(state, denoise(model, x, t_batch), generator)   # ε̂ (and x̂_0, v_Σ): diffusion.guidance

A sampler object holds no per-run data: everything a run needs (its respaced schedule, current x, index, options and,
for multistep methods, their history) lives in its `SamplerState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import torch

from diffusion.guidance import Denoised
from diffusion.sampler_specs import SamplerSpec
from diffusion.schedule import NoiseSchedule, logsnr_timesteps, spaced_timesteps

Progress = Callable[[int, int], None]


@lru_cache(maxsize=128)
def respaced(sched: NoiseSchedule, steps: int, spacing: str) -> NoiseSchedule:
    """`sched` restricted to `steps` timesteps chosen by `spacing` (itself when steps = T): one of
    `spaced_timesteps`' kinds, or "logsnr" (uniform in log-SNR, `logsnr_timesteps`). Cached per schedule."""
    if steps == sched.num_timesteps:
        return sched
    if spacing == "logsnr":
        return sched.respace(logsnr_timesteps(sched, steps))
    return sched.respace(spaced_timesteps(sched.num_timesteps, steps, spacing))


@dataclass(eq=False)
class SamplerState:
    """One batch's reverse process in flight.

    sched    the (respaced) schedule walked from index num_timesteps − 1 down to 0
    x        [B, C, H, W] the current sample
    i        index in `sched` of the next reverse step; −1 once finished
    options  the sampler's options, resolved against its catalog entry
    nfe      model calls so far
    memory   what a multistep method carries between calls (empty for one-step methods)
    """

    sched: NoiseSchedule
    x: torch.Tensor
    i: int
    options: dict[str, Any]
    nfe: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.i < 0


def draw_noise(state: SamplerState, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like state.x, drawn from `generator` on the generator's device, then moved to x's device
    (so a CPU generator gives the same noise whatever device samples)."""
    device = generator.device if generator is not None else state.x.device
    return torch.randn(state.x.shape, generator=generator, device=device).to(state.x.device)


class Sampler:
    """Base of the registered samplers; subclasses set `spec` and implement `step`."""

    spec: SamplerSpec

    # Can it start at ᾱ = 0 (a zero-terminal-SNR schedule's last step)? Only samplers that use x̂_0 there can.
    zero_terminal_snr = False

    def start(self, sched: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None, **options) -> SamplerState:
        """A run at its first reverse step from x_T: [B, C, H, W]; `steps` < T respaces by the `spacing` option.
        On a zero-terminal-SNR schedule the walk must start at T − 1: without an explicit `spacing` a default that
        would skip it becomes "trailing"; an explicit one that skips it is a ValueError."""
        resolved = self.spec.resolve(options)
        steps = self.spec.steps_for(sched.num_timesteps, steps)
        spacing = resolved.get("spacing", "linspace")
        if float(sched.alphas_cumprod[-1]) == 0.0:
            if not self.zero_terminal_snr:
                raise ValueError(f"sampler {self.spec.name!r} cannot start from a zero-terminal-SNR schedule "
                                 "(ᾱ = 0 at T − 1); use ddpm, ddim or dpmpp-2m")
            last = sched.num_timesteps - 1
            if spacing == "logsnr" or spaced_timesteps(sched.num_timesteps, steps, spacing)[-1] != last:
                if "spacing" in options:
                    raise ValueError(f"spacing {spacing!r} with {steps} steps skips the terminal step T − 1 of this "
                                     "zero-terminal-SNR model; use spacing 'trailing'")
                spacing = resolved["spacing"] = "trailing"
        walk = respaced(sched, steps, spacing)
        return SamplerState(walk, x_T, walk.num_timesteps - 1, resolved)

    def model_input(self, state: SamplerState) -> tuple[torch.Tensor, int]:
        """(x [B, C, H, W], t in ORIGINAL timestep units) at which the next model call evaluates ε."""
        return state.x, int(state.sched.timesteps[state.i])

    def step(self, state: SamplerState, out: Denoised, generator: torch.Generator | None) -> None:
        """Advance `state` with the model's output at `model_input(state)` (ε̂, and x̂_0 / v_Σ where the model
        gives them); noise comes from `generator`."""
        raise NotImplementedError

    def total_calls(self, state: SamplerState) -> int:
        """The NFE this run takes in all."""
        return self.spec.model_calls(state.sched.num_timesteps, state.options)

    @staticmethod
    def advance(state: SamplerState, x: torch.Tensor) -> None:
        """Move a run to its next reverse step at `x`, counting the model call that got it there."""
        state.x, state.i, state.nfe = x, state.i - 1, state.nfe + 1
