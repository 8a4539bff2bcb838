"""The samplers' catalog: names, options (defaults, bounds), default spacing and step count. Plain data, no torch.

`diffusion.samplers.SAMPLERS` holds the definition registered under each name here (a sampler registered with a new
entry adds it: `diffusion.samplers.register`). SAMPLER_NAMES are the built-in samplers. Readers that must not load torch (the
HTTP ingress) and those that only list or validate (the CLI, the page, the pipeline spec) read this catalog.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# diffusion.schedule.spaced_timesteps' kinds, and "logsnr": uniform in log-SNR (diffusion.schedule.logsnr_timesteps)
SPACINGS = ("linspace", "leading", "trailing", "quadratic", "logsnr")


@dataclass(frozen=True)
class OptionSpec:
    """One sampler option: its default and what values it takes (`choices`, or numeric bounds ge/le)."""

    default: Any
    description: str
    choices: tuple | None = None
    ge: float | None = None
    le: float | None = None

    def check(self, name: str, value: Any) -> Any:
        """`value` if valid for this option, else ValueError naming the option."""
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ValueError(f"option {name!r} must be a {kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"option {name!r} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if (self.ge is not None and value < self.ge) or (self.le is not None and value > self.le):
            raise ValueError(f"option {name!r} must be in [{self.ge}, {self.le}], got {value!r}")
        return value


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as callers see it.

    default_steps   reverse steps when none are asked for: an int, capped at T, or None for all T steps
    calls_per_step  model calls (NFE) per reverse step, plus the value of option `calls_option` when set
                    (a predictor–corrector's corrector steps); the last step makes `last_step_saves` fewer
    """

    name: str
    description: str
    options: dict[str, OptionSpec]
    default_steps: int | None = 50
    calls_per_step: int = 1
    calls_option: str | None = None
    last_step_saves: int = 0
    paper: str = ""
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(sorted(self.options)))

    def steps_for(self, T: int, steps: int | None = None) -> int:
        """The number of reverse steps for a model with T steps; `steps` outside [1, T] is a ValueError."""
        if steps is None:
            return T if self.default_steps is None else min(self.default_steps, T)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}] for this model, got {steps}")
        return steps

    def model_calls(self, steps: int, options: dict[str, Any] | None = None) -> int:
        """NFE of a run of `steps` reverse steps with `options` (defaults where not given)."""
        per_step = self.calls_per_step
        if self.calls_option is not None:
            per_step += (options or {}).get(self.calls_option, self.options[self.calls_option].default)
        return steps * per_step - self.last_step_saves

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option of this sampler, the given ones checked and the rest at their defaults. An option this
        sampler does not take is a ValueError that names it and the samplers that do take it."""
        for name in options:
            if name not in self.options:
                takers = [s.name for s in SAMPLER_SPECS.values() if name in s.options]
                where = f"applies only to sampler(s) {', '.join(takers)}" if takers else "is not a sampler option"
                raise ValueError(f"option {name!r} {where}; sampler {self.name!r} takes {', '.join(self.fields)}")
        return {name: spec.check(name, options[name]) if name in options else spec.default
                for name, spec in self.options.items()}


def _clip() -> OptionSpec:
    return OptionSpec(True, "clip the predicted x_0 to [-1, 1] at every step")


def _spacing(default: str) -> OptionSpec:
    return OptionSpec(default, "which original timesteps a respaced run visits", choices=SPACINGS)


SAMPLER_SPECS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(
        "ddpm", "ancestral sampling of the reverse Markov chain", default_steps=None,
        paper="Ho et al. 2020, Alg. 2",
        options={"variance": OptionSpec("small", "σ_t² = β̃_t (small) or β_t (large)", choices=("small", "large")),
                 "clip_x0": _clip(), "spacing": _spacing("linspace")}),
    "ddim": SamplerSpec(
        "ddim", "implicit sampler; deterministic at eta = 0", default_steps=50, paper="Song et al. 2021, eq. 12",
        options={"eta": OptionSpec(0.0, "stochasticity η (0 = deterministic, 1 = DDPM posterior variance)",
                                   ge=0.0, le=1.0),
                 "clip_x0": _clip(), "spacing": _spacing("leading")}),
    "sde": SamplerSpec(
        "sde", "reverse-time VP SDE, ancestral discretisation x ← (x + β s) / √(1 − β) + √β z", default_steps=None,
        paper="Song et al. 2021, reverse diffusion predictor", options={"spacing": _spacing("linspace")}),
    "pc": SamplerSpec(
        "pc", "predictor–corrector: the sde predictor plus Langevin corrector steps at each noise level",
        default_steps=None, calls_option="corrector_steps", paper="Song et al. 2021, Alg. 5 (VP)",
        options={"corrector_steps": OptionSpec(1, "Langevin corrector steps per noise level (each a model call)",
                                               ge=0, le=10),
                 "snr": OptionSpec(0.16, "corrector signal-to-noise ratio r: step 2α r² (1 − ᾱ_t), Song et al.'s "
                                         "2α (r‖z‖ / ‖s‖)² at the norms' expectations", ge=0.0, le=1.0),
                 "spacing": _spacing("linspace")}),
    "ode-euler": SamplerSpec(
        "ode-euler", "probability-flow ODE, Euler steps in σ = √(1 − ᾱ)/√ᾱ (equals DDIM at η = 0, unclipped)",
        default_steps=50, paper="Song et al. 2021 eq. 13; Karras et al. 2022", options={"spacing": _spacing("linspace")}),
    "ode-heun": SamplerSpec(
        "ode-heun", "probability-flow ODE, Heun's 2nd-order steps in σ (Euler on the last step to σ = 0)",
        default_steps=18, calls_per_step=2, last_step_saves=1, paper="Karras et al. 2022, Alg. 1",
        options={"spacing": _spacing("linspace")}),
    "dpmpp-2m": SamplerSpec(
        "dpmpp-2m", "DPM-Solver++(2M): 2nd-order multistep ODE solver in data prediction on log-SNR",
        default_steps=20, paper="Lu et al. 2022, Alg. 2", options={"clip_x0": _clip(), "spacing": _spacing("logsnr")}),
    "distilled": SamplerSpec(
        "distilled", "a progressively distilled student (the distill stage): deterministic DDIM on the trailing grid "
        "it was trained on; steps = the model's distilled_steps", default_steps=4,
        paper="Salimans & Ho 2022, Alg. 2", options={"clip_x0": _clip(), "spacing": OptionSpec(
            "trailing", "the student's grid (every other step of its teacher's)", choices=("trailing",))}),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_SPECS)


def sampler_spec(name: str) -> SamplerSpec:
    """The catalog entry of `name`; an unknown name is a ValueError listing the known ones."""
    if name not in SAMPLER_SPECS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLER_SPECS)}")
    return SAMPLER_SPECS[name]
