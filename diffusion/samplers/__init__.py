"""Samplers: DDPM ancestral sampling (Ho et al. 2020, Alg. 2) and DDIM (Song et al. 2021, eq. 12), one step at a time.

Steps are pure functions of the model's ε and explicit noise; `Sampler` objects (registered in SAMPLERS) advance a
`SamplerState` one model call at a time; `sample(...)` runs any of them to the end. `i` indexes the (possibly
respaced) schedule; the model always receives `sched.timesteps[i]`, the ORIGINAL step. The last step (i = 0) goes to
ᾱ_prev = 1, i.e. it returns x̂_0-based samples at t = 0 with no noise added.
"""

from diffusion.samplers.base import Progress, Sampler, SamplerState, draw_noise, respaced
from diffusion.samplers.ddim import DDIM, ddim_encode, ddim_sigma, ddim_step
from diffusion.samplers.ddpm import DDPM, ddpm_step
from diffusion.samplers.loop import ddim_sample, ddpm_sample, model_eps, sample
from diffusion.samplers.registry import SAMPLERS, get_sampler

__all__ = ["DDIM", "DDPM", "SAMPLERS", "Progress", "Sampler", "SamplerState", "ddim_encode", "ddim_sample",
           "ddim_sigma", "ddim_step", "ddpm_sample", "ddpm_step", "draw_noise", "get_sampler", "model_eps",
           "respaced", "sample"]
