"""Samplers, one step at a time: DDPM ancestral sampling (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eq. 12),
the reverse SDE and predictor–corrector (Song et al. 2021), probability-flow ODE Euler/Heun (Karras et al. 2022) and
DPM-Solver++(2M) (Lu et al. 2022).

Steps are pure functions of the model's ε and explicit noise; `Sampler` objects (registered in SAMPLERS) advance a
`SamplerState` one model call at a time; `sample(...)` runs any of them to the end. `i` indexes the (possibly
respaced) schedule; the model always receives `sched.timesteps[i]`, the ORIGINAL step. The last step (i = 0) goes to
ᾱ_prev = 1, i.e. it returns x̂_0-based samples at t = 0 with no noise added.
"""

from diffusion.samplers.base import Progress, Sampler, SamplerState, draw_noise, respaced
from diffusion.samplers.ddim import DDIM, ddim_encode, ddim_sigma, ddim_step
from diffusion.samplers.ddpm import DDPM, ddpm_step
from diffusion.samplers.dpm_solver import DPMSolverPP2M, dpmpp_2m_step, log_snr
from diffusion.samplers.ode import ODEEuler, ODEHeun, ode_euler_step, ode_heun_step
from diffusion.samplers.sde import PredictorCorrector, ReverseSDE, reverse_sde_step, snr_step_size
from diffusion.samplers.loop import ddim_sample, ddpm_sample, model_eps, sample
from diffusion.samplers.registry import SAMPLERS, get_sampler

__all__ = ["DDIM", "DDPM", "DPMSolverPP2M", "ODEEuler", "ODEHeun", "PredictorCorrector", "ReverseSDE", "SAMPLERS",
           "Progress", "Sampler", "SamplerState", "ddim_encode", "ddim_sample", "ddim_sigma", "ddim_step",
           "ddpm_sample", "ddpm_step", "dpmpp_2m_step", "draw_noise", "get_sampler", "log_snr", "model_eps",
           "ode_euler_step", "ode_heun_step", "respaced", "reverse_sde_step", "sample", "snr_step_size"]
