import math

import numpy as np
import pytest
import torch

from diffusion.samplers import ddim_encode, ddim_sample, ddim_sigma, ddim_step, ddpm_sample, ddpm_step
from diffusion.schedule import NoiseSchedule, spaced_timesteps
from tests.diffusion.oracles import ConstantEps, GaussianOracle


@pytest.mark.parametrize("steps", [1000, 37])
def test_ddim_eta1_step_equals_ddpm_small_variance_step(steps):
    sched = NoiseSchedule.linear().respace(spaced_timesteps(1000, steps, "linspace"))
    g = torch.Generator().manual_seed(0)
    for i in [0, 1, steps // 2, steps - 1]:
        x, eps, z = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
        for clip in (False, True):
            a = ddim_step(sched, eps, x, i, eta=1.0, noise=z, clip_x0=clip)
            b = ddpm_step(sched, eps, x, i, noise=z, variance="small", clip_x0=clip)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        if i > 0:
            assert ddim_sigma(sched, i, 1.0) ** 2 == pytest.approx(sched.posterior_variance[i], rel=1e-10)


def test_ddim_eta0_is_deterministic_and_ignores_the_generator():
    sched = NoiseSchedule.linear(100)
    model = GaussianOracle(sched, 0.1, 0.5)
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(model, sched, x_T.shape, steps=10, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(model, sched, x_T.shape, steps=10, x_T=x_T, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seeded_generator_reproduces_ddpm_samples():
    sched = NoiseSchedule.linear(50)
    model = GaussianOracle(sched, 0.0, 0.5)
    a = ddpm_sample(model, sched, (3, 1, 2, 2), generator=torch.Generator().manual_seed(5))
    b = ddpm_sample(model, sched, (3, 1, 2, 2), generator=torch.Generator().manual_seed(5))
    c = ddpm_sample(model, sched, (3, 1, 2, 2), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddim_inversion_round_trips_on_a_straight_path(spacing):
    sched = NoiseSchedule.linear()
    eps = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = ConstantEps(eps)
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    x_T = ddim_encode(model, sched, x0, steps=20, spacing=spacing)
    back = ddim_sample(model, sched, x0.shape, steps=20, spacing=spacing, x_T=x_T, clip_x0=False)
    torch.testing.assert_close(back, x0, rtol=1e-9, atol=1e-9)


def _exact_final_moments(sched, mu, s, eta, variance=None):
    """Mean and variance of x_0 produced by the discrete update rule with the Gaussian oracle, from x_T ~ N(0, 1).

    ε̂ is affine in x (ε̂ = β x + γ), so each step maps x ↦ A x + c plus independent σ z: propagate (mean, var).
    """
    m, v = 0.0, 1.0
    abar_orig = None
    for i in reversed(range(sched.num_timesteps)):
        abar, abar_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        k = abar * s * s + (1 - abar)
        beta_e, gamma_e = b / k, -b * a * mu / k  # ε̂ = beta_e x + gamma_e
        beta_x0, gamma_x0 = (1 - b * beta_e) / a, -b * gamma_e / a  # x̂_0 = (x − b ε̂)/a
        if variance is None:  # DDIM with η
            sigma = ddim_sigma(sched, i, eta)
            d = math.sqrt(max(1 - abar_prev - sigma**2, 0.0))
            A, c = math.sqrt(abar_prev) * beta_x0 + d * beta_e, math.sqrt(abar_prev) * gamma_x0 + d * gamma_e
            noise_var = sigma**2 if i > 0 else 0.0
        else:  # DDPM
            c1, c2 = sched.posterior_mean_coef1[i], sched.posterior_mean_coef2[i]
            A, c = c1 * beta_x0 + c2, c1 * gamma_x0
            noise_var = 0.0 if i == 0 else (sched.posterior_variance[i] if variance == "small" else sched.betas[i])
        m, v = A * m + c, A * A * v + noise_var
    return m, v


def _sample_moments(x):
    return x.mean().item(), x.std().item()


def test_ddpm_1000_steps_reproduces_narrow_gaussian_data():
    mu, s = 0.3, 0.15
    sched = NoiseSchedule.linear()
    x = ddpm_sample(GaussianOracle(sched, mu, s), sched, (20000, 1), generator=torch.Generator().manual_seed(0),
                    clip_x0=False)
    mean, std = _sample_moments(x)
    assert mean == pytest.approx(mu, abs=0.01)
    assert std == pytest.approx(s, rel=0.04)
    m_exact, v_exact = _exact_final_moments(sched, mu, s, 0.0, variance="small")
    assert mean == pytest.approx(m_exact, abs=4 * math.sqrt(v_exact / 20000))
    assert std == pytest.approx(math.sqrt(v_exact), rel=0.03)


def test_ddim_50_steps_reproduces_wide_gaussian_data():
    """DDIM η=0 is a first-order ODE solver: close for s ≈ 1 (DESIGN.md, testing the math). Each step scales by
    cos(Δθ) < 1 where the exact flow is the identity, so the update rule itself gives std ≈ 0.964 at 50 steps."""
    mu, s = 0.2, 1.0
    sched = NoiseSchedule.linear()
    x = ddim_sample(GaussianOracle(sched, mu, s), sched, (20000, 1), steps=50,
                    generator=torch.Generator().manual_seed(1), clip_x0=False)
    mean, std = _sample_moments(x)
    assert mean == pytest.approx(mu, abs=0.03)
    assert std == pytest.approx(s, rel=0.05)


@pytest.mark.parametrize("steps, eta", [(50, 0.0), (10, 0.0), (20, 0.5)])
def test_few_step_ddim_matches_the_exact_distribution_of_its_update_rule(steps, eta):
    mu, s = 0.3, 0.15
    full = NoiseSchedule.linear()
    x = ddim_sample(GaussianOracle(full, mu, s), full, (20000, 1), steps=steps, eta=eta,
                    generator=torch.Generator().manual_seed(2), clip_x0=False)
    m_exact, v_exact = _exact_final_moments(full.respace(spaced_timesteps(1000, steps, "leading")), mu, s, eta)
    mean, std = _sample_moments(x)
    assert mean == pytest.approx(m_exact, abs=4 * math.sqrt(v_exact / 20000) + 1e-6)
    assert std == pytest.approx(math.sqrt(v_exact), rel=0.03)


def test_respaced_ddpm_passes_original_timesteps_and_reports_progress():
    sched = NoiseSchedule.linear()
    seen, calls = [], []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen.append(int(t[0]))
            return torch.zeros_like(x)

    ddpm_sample(Recorder(), sched, (2, 1), steps=10, progress=lambda k, n: calls.append((k, n)))
    assert seen == list(np.round(np.linspace(0, 999, 10)).astype(int))[::-1]
    assert calls == [(k, 10) for k in range(1, 11)]


def test_clipping_keeps_x0_prediction_in_range():
    sched = NoiseSchedule.linear(100)
    x = torch.full((1, 1), 50.0)
    out = ddim_step(sched, torch.zeros_like(x), x, 0, clip_x0=True)
    assert out.abs().max() <= 1.0
