"""What a sampler is, written once: a generator function over a walk down the (respaced) schedule that yields each
model call it needs, (x [B, C, H, W], t in ORIGINAL timestep units), receives the model's `Denoised` output for it,
keeps its state (multistep history, Heun's proposal, corrector counts) in local variables, and returns x_0.

    @register(SAMPLER_SPECS["ddim"], zero_terminal_snr=True)
    def ddim(walk: Walk) -> Steps:
        x = walk.x_T
        for i in walk.indices():                      # num_timesteps − 1 down to 0
            out = yield x, walk.t(i)                  # one model call
            x = ddim_step(walk.sched, out.eps, x, i, ...)
        return x

`register` puts the definition in SAMPLERS under its catalog entry (diffusion.sampler_specs, added there when new),
and every way of running a sampler derives from it: `Sampler.start / model_input / step` advance any registered
definition one model call at a time (the serving engine batches many runs into each call; `diffusion.samplers.sample`
runs one to the end). A sampler's noise comes from `walk.noise()`, drawn from the run's generator after the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Generator

import torch

from diffusion.sampler_specs import SAMPLER_SPECS, SamplerSpec, sampler_spec
from diffusion.schedule import NoiseSchedule, logsnr_timesteps, spaced_timesteps

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Denoised:
    """What a sampler receives from one model call, per image.

    eps         ε̂ [B, C, H, W]
    x0          x̂_0 [B, C, H, W] unclipped, or None (samplers then compute it from ε̂; needed where ᾱ_t = 0)
    var_values  the learned-variance channels v_Σ [B, C, H, W] (eq. 15 of Improved DDPM), or None (fixed variance)
    """

    eps: torch.Tensor
    x0: torch.Tensor | None = None
    var_values: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list["Denoised"]) -> "Denoised":
        """Row-wise concatenation of `parts` (all with the same fields present)."""
        return Denoised(*(None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
                          for name in ("eps", "x0", "var_values")))

    def split(self, sizes: list[int]) -> list["Denoised"]:
        """Consecutive row groups of `sizes` (summing to B)."""
        parts = [values.split(sizes) if values is not None else [None] * len(sizes)
                 for values in (self.eps, self.x0, self.var_values)]
        return [Denoised(*group) for group in zip(*parts)]


@lru_cache(maxsize=128)
def respaced(sched: NoiseSchedule, steps: int, spacing: str) -> NoiseSchedule:
    """`sched` restricted to `steps` timesteps chosen by `spacing` (itself when steps = T): one of
    `spaced_timesteps`' kinds, or "logsnr" (uniform in log-SNR, `logsnr_timesteps`). Cached per schedule."""
    if steps == sched.num_timesteps:
        return sched
    if spacing == "logsnr":
        return sched.respace(logsnr_timesteps(sched, steps))
    return sched.respace(spaced_timesteps(sched.num_timesteps, steps, spacing))


def model_eps(model: torch.nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """ε̂ = model(x, t) with t (ORIGINAL units) broadcast to [B]; checks the output's shape. x: [B, C, H, W]."""
    eps = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
    assert eps.shape == x.shape, f"model output {tuple(eps.shape)} != input {tuple(x.shape)}"
    return eps.to(x.dtype)


@dataclass(eq=False)
class Walk:
    """One run's fixed inputs, handed to a sampler definition.

    sched      the (respaced) schedule walked from index num_timesteps − 1 down to 0
    x_T        [B, C, H, W] the starting sample
    options    the sampler's options, resolved against its catalog entry
    generator  where `noise()` draws from; set by whoever advances the run, before each model output is sent
    """

    sched: NoiseSchedule
    x_T: torch.Tensor
    options: dict[str, Any]
    generator: torch.Generator | None = None

    def indices(self) -> range:
        """The reverse walk's schedule indices: num_timesteps − 1, …, 0."""
        return range(self.sched.num_timesteps - 1, -1, -1)

    def t(self, i: int) -> int:
        """The ORIGINAL timestep of schedule index i (what the model is conditioned on)."""
        return int(self.sched.timesteps[i])

    def noise(self) -> torch.Tensor:
        """z ~ N(0, I) shaped like x_T, drawn from the generator on the generator's device, then moved to x_T's
        device (so a CPU generator gives the same noise whatever device samples)."""
        device = self.generator.device if self.generator is not None else self.x_T.device
        return torch.randn(self.x_T.shape, generator=self.generator, device=device).to(self.x_T.device)


Steps = Generator[tuple[torch.Tensor, int], Denoised, torch.Tensor]
Definition = Callable[[Walk], Steps]


@dataclass(eq=False)
class SamplerState:
    """One batch's reverse process in flight: its walk, its definition's running generator and the model call it
    waits for. x is that call's input while running and the result once done; nfe counts the model calls so far."""

    walk: Walk
    steps: Steps
    x: torch.Tensor
    t: int
    nfe: int = 0
    done: bool = False

    @property
    def sched(self) -> NoiseSchedule:
        return self.walk.sched

    @property
    def options(self) -> dict[str, Any]:
        return self.walk.options


@dataclass(frozen=True)
class Sampler:
    """A registered definition with its catalog entry; runs any definition one model call at a time:

        state = sampler.start(sched, x_T, steps, **options)
        while not state.done:
            x, t = sampler.model_input(state)
            sampler.step(state, denoise(model, x, t_batch), generator)   # diffusion.samplers.guidance
    """

    spec: SamplerSpec
    definition: Definition
    zero_terminal_snr: bool = False  # can it start at ᾱ = 0? Only samplers that use x̂_0 there can.

    def start(self, sched: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None, **options) -> SamplerState:
        """A run at its first model call from x_T: [B, C, H, W]; `steps` < T respaces by the `spacing` option."""
        resolved = self.spec.resolve(options)
        steps = self.spec.steps_for(sched.num_timesteps, steps)
        if "spacing" in resolved:
            resolved["spacing"] = self._spacing(sched, steps, resolved["spacing"], "spacing" in options)
        elif float(sched.alphas_cumprod[-1]) == 0.0 and not self.zero_terminal_snr:
            self._spacing(sched, steps, "linspace", False)
        walk = Walk(respaced(sched, steps, resolved.get("spacing", "linspace")), x_T, resolved)
        run = self.definition(walk)
        x, t = next(run)
        return SamplerState(walk, run, x, t)

    def _spacing(self, sched: NoiseSchedule, steps: int, spacing: str, explicit: bool) -> str:
        """On a zero-terminal-SNR schedule the walk must start at T − 1: without an explicit `spacing` a default that
        would skip it becomes "trailing"; an explicit one that skips it is a ValueError."""
        if float(sched.alphas_cumprod[-1]) != 0.0:
            return spacing
        if not self.zero_terminal_snr:
            raise ValueError(f"sampler {self.spec.name!r} cannot start from a zero-terminal-SNR schedule "
                             "(ᾱ = 0 at T − 1); use ddpm, ddim or dpmpp-2m")
        last = sched.num_timesteps - 1
        if spacing == "logsnr" or spaced_timesteps(sched.num_timesteps, steps, spacing)[-1] != last:
            if explicit:
                raise ValueError(f"spacing {spacing!r} with {steps} steps skips the terminal step T − 1 of this "
                                 "zero-terminal-SNR model; use spacing 'trailing'")
            return "trailing"
        return spacing

    @staticmethod
    def model_input(state: SamplerState) -> tuple[torch.Tensor, int]:
        """(x [B, C, H, W], t in ORIGINAL timestep units) at which the next model call evaluates ε."""
        return state.x, state.t

    @staticmethod
    def step(state: SamplerState, out: Denoised, generator: torch.Generator | None) -> None:
        """Advance `state` with the model's output at `model_input(state)`; noise comes from `generator`."""
        state.walk.generator = generator
        state.nfe += 1
        try:
            state.x, state.t = state.steps.send(out)
        except StopIteration as finished:
            state.x, state.done = finished.value, True

    def total_calls(self, state: SamplerState) -> int:
        """The NFE this run takes in all."""
        return self.spec.model_calls(state.sched.num_timesteps, state.options)


SAMPLERS: dict[str, Sampler] = {}


def register(spec: SamplerSpec, zero_terminal_snr: bool = False) -> Callable[[Definition], Definition]:
    """Decorator: register a definition under `spec.name` in SAMPLERS, and `spec` in the catalog when it is not
    there yet (a catalog entry already there must be this one)."""

    def add(definition: Definition) -> Definition:
        if SAMPLER_SPECS.setdefault(spec.name, spec) is not spec:
            raise ValueError(f"sampler {spec.name!r} is already in the catalog with another entry")
        SAMPLERS[spec.name] = Sampler(spec, definition, zero_terminal_snr)
        return definition

    return add


def get_sampler(name: str) -> Sampler:
    """The sampler registered as `name`; an unknown name is a ValueError listing the known ones."""
    sampler_spec(name)
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is in the catalog but has no registered definition")
    return SAMPLERS[name]
