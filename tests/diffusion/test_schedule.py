import math

import numpy as np
import pytest
import torch

from diffusion.schedule import NoiseSchedule, spaced_timesteps


def test_linear_defaults_and_cumprod():
    s = NoiseSchedule.linear()
    assert s.num_timesteps == 1000 and s.betas.dtype == np.float64
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    direct = np.array([math.prod(1 - b for b in s.betas[: i + 1]) for i in range(0, 1000, 97)])
    np.testing.assert_allclose(s.alphas_cumprod[::97], direct, rtol=1e-12)
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    np.testing.assert_array_equal(s.timesteps, np.arange(1000))


def test_arrays_are_read_only():
    s = NoiseSchedule.linear(10)
    with pytest.raises(ValueError):
        s.betas[0] = 0.5


def test_cosine_matches_closed_form_alpha_bar():
    T, off = 1000, 0.008
    s = NoiseSchedule.cosine(T, off)
    f = lambda u: math.cos((u / T + off) / (1 + off) * math.pi / 2) ** 2  # noqa: E731
    # ᾱ(t) = f(t)/f(0) wherever β was not clipped at 0.999 (everything but the very last steps).
    for i in [0, 10, 500, 900]:
        assert s.alphas_cumprod[i] == pytest.approx(f(i + 1) / f(0), rel=1e-10)


def test_posterior_matches_bayes_rule():
    """q(x_{t−1}|x_t,x_0) ∝ N(x_t; √α_t x_{t−1}, β_t) · N(x_{t−1}; √ᾱ_{t−1} x_0, 1−ᾱ_{t−1}): product of Gaussians."""
    s = NoiseSchedule.linear()
    rng = np.random.default_rng(0)
    for i in [1, 2, 10, 400, 999]:
        x0, xt = rng.normal(size=2)
        a, b, abar_prev = s.alphas[i], s.betas[i], s.alphas_cumprod_prev[i]
        precision = a / b + 1 / (1 - abar_prev)
        mean = (math.sqrt(a) * xt / b + math.sqrt(abar_prev) * x0 / (1 - abar_prev)) / precision
        assert s.posterior_variance[i] == pytest.approx(1 / precision, rel=1e-10)
        got = s.posterior_mean_coef1[i] * x0 + s.posterior_mean_coef2[i] * xt
        assert got == pytest.approx(mean, rel=1e-9, abs=1e-12)
    # t = 0 (index 0): ᾱ_prev = 1, the posterior is a point mass at x_0; its log-variance is clipped to β̃ at index 1.
    assert s.posterior_variance[0] == 0 and s.posterior_mean_coef2[0] == 0
    assert s.posterior_mean_coef1[0] == pytest.approx(1.0, rel=1e-12)
    assert s.posterior_log_variance_clipped[0] == pytest.approx(math.log(s.posterior_variance[1]))
    np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(s.posterior_variance[1:]))


@pytest.mark.parametrize("kind", ["linspace", "leading", "trailing", "quadratic"])
def test_respace_keeps_alpha_bar_at_kept_steps(kind):
    s = NoiseSchedule.linear()
    tau = spaced_timesteps(1000, 50, kind)
    assert len(tau) == 50 and np.all(np.diff(tau) > 0) and tau[0] >= 0 and tau[-1] <= 999
    r = s.respace(tau)
    np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[tau], rtol=1e-12)
    np.testing.assert_array_equal(r.timesteps, tau)
    assert r.alphas_cumprod_prev[0] == 1.0  # every sampler's last step lands on ᾱ_prev = 1
    np.testing.assert_allclose(r.betas, 1 - s.alphas_cumprod[tau] / np.append(1.0, s.alphas_cumprod[tau[:-1]]))


def test_respace_of_all_steps_is_identity_and_respace_composes():
    s = NoiseSchedule.linear(100)
    np.testing.assert_allclose(s.respace(np.arange(100)).betas, s.betas, rtol=1e-10)
    coarse = s.respace([0, 10, 20, 50, 99]).respace([1, 3, 4])
    np.testing.assert_array_equal(coarse.timesteps, [10, 50, 99])
    np.testing.assert_allclose(coarse.alphas_cumprod, s.alphas_cumprod[[10, 50, 99]], rtol=1e-12)


def test_spacings_match_their_definitions():
    np.testing.assert_array_equal(spaced_timesteps(1000, 10, "leading"), np.arange(0, 1000, 100))
    np.testing.assert_array_equal(spaced_timesteps(1000, 10, "trailing"), np.arange(99, 1000, 100))
    np.testing.assert_array_equal(spaced_timesteps(10, 10, "linspace"), np.arange(10))
    q = spaced_timesteps(1000, 10, "quadratic")
    np.testing.assert_array_equal(q, np.round(np.linspace(0, math.sqrt(800), 10) ** 2).astype(int))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: spaced_timesteps(100, 0), "number of steps"),
        (lambda: spaced_timesteps(100, 101), "number of steps"),
        (lambda: spaced_timesteps(100, 10, "cubic"), "unknown spacing"),
        (lambda: NoiseSchedule.linear(10).respace([3, 2]), "strictly increasing"),
        (lambda: NoiseSchedule.linear(10).respace([0, 10]), "strictly increasing"),
        (lambda: NoiseSchedule.from_betas([0.1, 1.5]), "betas must lie"),
    ],
)
def test_bad_arguments_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_to_tensor_gathers_and_broadcasts():
    s = NoiseSchedule.linear(10)
    t = torch.tensor([0, 9, 3])
    v = s.to_tensor("alphas_cumprod", t, 4)
    assert v.shape == (3, 1, 1, 1) and v.dtype == torch.float32
    np.testing.assert_allclose(v.flatten().numpy(), s.alphas_cumprod[[0, 9, 3]], rtol=1e-6)
