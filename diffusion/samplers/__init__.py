"""Samplers: DDPM ancestral sampling (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eq. 12), the reverse SDE and
predictor–corrector (Song et al. 2021), probability-flow ODE Euler/Heun (Karras et al. 2022) and DPM-Solver++(2M)
(Lu et al. 2022), and the distilled student's DDIM (Salimans & Ho 2022).

Steps are pure functions of the model's ε and explicit noise; each sampler is one generator function over them,
registered in SAMPLERS (diffusion.samplers.base); `sample(...)` runs any of them to the end. `i` indexes the
(possibly respaced) schedule; the model always receives `sched.timesteps[i]`, the ORIGINAL step. The last step
(i = 0) goes to ᾱ_prev = 1, i.e. it returns x̂_0-based samples at t = 0 with no noise added.
"""

from diffusion.samplers.base import (SAMPLERS, Denoised, Progress, Sampler, SamplerState, Steps, Walk, get_sampler,
                                     model_eps, register, respaced)
# Importing a sampler's file registers it; SAMPLERS lists them in this order (the catalog's).
from diffusion.samplers.ddpm import ddpm_step
from diffusion.samplers.ddim import ddim_encode, ddim_sigma, ddim_step
from diffusion.samplers.sde import corrector_step_size, reverse_sde_step
from diffusion.samplers.ode import ode_euler_step, ode_heun_step
from diffusion.samplers.dpm_solver import dpmpp_2m_step
from diffusion.samplers.distilled import distilled
from diffusion.samplers.loop import ddim_sample, ddpm_sample, sample

__all__ = ["SAMPLERS", "Denoised", "Progress", "Sampler", "SamplerState", "Steps", "Walk", "ddim_encode", "ddim_sample",
           "distilled",
           "ddim_sigma", "ddim_step", "ddpm_sample", "ddpm_step", "dpmpp_2m_step", "get_sampler", "model_eps",
           "ode_euler_step", "ode_heun_step", "register", "respaced", "reverse_sde_step", "sample", "corrector_step_size"]
