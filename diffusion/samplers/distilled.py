"""The sampler of a progressively distilled student (diffusion.distill, the distill stage): DDIM at η = 0 on the
trailing grid the student was trained on, at the student's own step count (its model metadata's distilled_steps)."""

from __future__ import annotations

from diffusion.sampler_specs import SAMPLER_SPECS
from diffusion.samplers.base import Steps, Walk, register
from diffusion.samplers.ddim import ddim_step


@register(SAMPLER_SPECS["distilled"], zero_terminal_snr=True)
def distilled(walk: Walk) -> Steps:
    """One deterministic DDIM step per grid point: the map each student step learned to take."""
    x = walk.x_T
    for i in walk.indices():
        out = yield x, walk.t(i)
        x = ddim_step(walk.sched, out.eps, x, i, 0.0, None, walk.options["clip_x0"], out.x0)
    return x
