"""The predictor–corrector sampler against the exact law: with the exact score of Gaussian data N(μ, s² I) in 4
dimensions, pc at 1,000 steps returns samples whose mean and standard deviation match μ and s within 5%, and the
corrector's step size for an image does not depend on the other images of its batch."""

import math

import pytest
import torch

from diffusion.samplers import sample
from diffusion.samplers.sde import corrector_step_size
from diffusion.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear(1000)
MU, S, DIM = 0.5, 0.3, 4


def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε(x, t) = −√(1 − ᾱ) ∇ log p_t(x), p_t = N(√ᾱ μ, (ᾱ s² + 1 − ᾱ) I): the exact optimal denoiser."""
    abar = SCHED.table("alphas_cumprod", x.device, x.dtype)[t].reshape(-1, 1)
    return (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)


@pytest.mark.parametrize("corrector_steps", [1, 2])
def test_pc_matches_the_exact_law_in_four_dimensions(corrector_steps):
    x = sample(exact_eps, SCHED, (4000, DIM), "pc", 1000, generator=torch.Generator().manual_seed(0),
               corrector_steps=corrector_steps)
    assert abs(x.mean().item() - MU) < 0.05 * MU
    assert abs(x.std(dim=0).mean().item() - S) < 0.05 * S, x.std(dim=0)


def test_the_corrector_step_size_depends_on_the_noise_level_only():
    """δ_i = 2 α_i r² (1 − ᾱ_i): Song et al.'s 2α (r ‖z‖ / ‖s‖)² with both norms at their expectations (d and
    d / (1 − ᾱ_i)), so no image's step depends on another's, nor on its own draw."""
    for i in (0, 10, 500, 999):
        expected = 2 * float(SCHED.alphas[i]) * 0.16**2 * (1 - float(SCHED.alphas_cumprod[i]))
        assert math.isclose(corrector_step_size(SCHED, i, 0.16), expected, rel_tol=1e-12)
