"""SAMPLERS: name → sampler, one per entry of `diffusion.sampler_specs.SAMPLER_SPECS` (checked at import)."""

from __future__ import annotations

from diffusion.sampler_specs import SAMPLER_NAMES, sampler_spec
from diffusion.samplers.base import Sampler
from diffusion.samplers.ddim import DDIM
from diffusion.samplers.ddpm import DDPM
from diffusion.samplers.dpm_solver import DPMSolverPP2M
from diffusion.samplers.ode import ODEEuler, ODEHeun
from diffusion.samplers.sde import PredictorCorrector, ReverseSDE

SAMPLERS: dict[str, Sampler] = {s.spec.name: s for s in (DDPM(), DDIM(), ReverseSDE(), PredictorCorrector(),
                                                          ODEEuler(), ODEHeun(), DPMSolverPP2M())}
assert tuple(SAMPLERS) == SAMPLER_NAMES, "every catalog entry needs an implementation and vice versa"


def get_sampler(name: str) -> Sampler:
    """The sampler registered as `name`; an unknown name is a ValueError listing the known ones."""
    sampler_spec(name)
    return SAMPLERS[name]
