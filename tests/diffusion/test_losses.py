import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffusion.losses import (
    discretized_gaussian_log_likelihood,
    l_simple,
    nll_bpd,
    normal_kl,
    prior_bpd,
    vlb_terms,
)
from diffusion.schedule import NoiseSchedule
from tests.diffusion.oracles import GaussianOracle, discretized_gaussian_probs

GRID = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 values of 8-bit data in [−1, 1]


@pytest.mark.parametrize("m1, v1, m2, v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.0, 0.3)])
def test_normal_kl_matches_numerical_integration(m1, v1, m2, v2):
    p, q = stats.norm(m1, v1**0.5), stats.norm(m2, v2**0.5)
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30, points=[m1], limit=200)
    got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, math.log(v1), m2, math.log(v2))))
    assert got.item() == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("mean, scale", [(0.0, 0.05), (0.37, 0.004), (-0.9, 0.3), (0.99, 1e-3)])
def test_discretized_gaussian_matches_cdf_differences_and_normalises(mean, scale):
    log_p = discretized_gaussian_log_likelihood(GRID, torch.tensor(mean, dtype=torch.float64),
                                                torch.tensor(math.log(scale), dtype=torch.float64))
    assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-9)
    edges = np.concatenate([[-np.inf], GRID.numpy()[:-1] + 1 / 255, [np.inf]])
    left = stats.norm.cdf(edges[1:], mean, scale) - stats.norm.cdf(edges[:-1], mean, scale)
    right = stats.norm.sf(edges[:-1], mean, scale) - stats.norm.sf(edges[1:], mean, scale)  # precise right of mean
    expected = np.where(GRID.numpy() > mean, right, left)
    keep = expected > 1e-300
    np.testing.assert_allclose(log_p.numpy()[keep], np.log(expected[keep]), rtol=1e-6, atol=1e-9)


def test_discretized_gaussian_keeps_precision_in_the_tails():
    """A bin 40 σ from the mean has log-mass ≈ −800: a plain Φ(u) − Φ(l) would give −inf."""
    x = torch.tensor([0.5], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(x, torch.tensor(0.1, dtype=torch.float64),
                                                torch.tensor(math.log(0.01), dtype=torch.float64))
    lo, hi = (0.5 - 1 / 255 - 0.1) / 0.01, (0.5 + 1 / 255 - 0.1) / 0.01
    expected = stats.norm.logsf(lo) + np.log(-np.expm1(stats.norm.logsf(hi) - stats.norm.logsf(lo)))
    assert log_p.item() == pytest.approx(expected, rel=1e-6)


def test_prior_bpd_closed_form():
    s = NoiseSchedule.linear()
    abar = s.alphas_cumprod[-1]
    x0 = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    kl_nats = [0.5 * (-math.log(1 - abar) + (1 - abar) + abar * v**2 - 1) for v in (0.0, 1.0)]
    np.testing.assert_allclose(prior_bpd(s, x0).numpy(), np.array(kl_nats) / math.log(2), rtol=1e-9)


def test_l_simple_of_the_exact_denoiser_equals_posterior_variance_of_eps():
    """For x_0 ~ N(μ, s²): E L_simple = mean_t Var(ε | x_t) = mean_t a_t² s² / (a_t² s² + b_t²)."""
    s_data, mu = 0.4, 0.2
    sched = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    x0 = mu + s_data * torch.randn(400_000, 1, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    got = l_simple(GaussianOracle(sched, mu, s_data), sched, x0, t, noise).item()
    abar = sched.alphas_cumprod
    expected = np.mean(abar * s_data**2 / (abar * s_data**2 + 1 - abar))
    assert got == pytest.approx(expected, rel=0.01)


def _discretized_data(mu, s, n, seed):
    probs = discretized_gaussian_probs(mu, s)
    idx = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return GRID[idx].reshape(n, 1), probs


def test_kl_terms_match_their_closed_form_expectation():
    """With x̂_0 linear in x_t, E‖x_0 − x̂_0‖² has a closed form for ANY data with known mean and variance, hence
    E L_{t−1} = coef1² E(x_0 − x̂_0)² / (2 β̃_t ln 2) bits (small variance: the log/trace terms cancel)."""
    mu, s = 0.1, 0.3
    sched = NoiseSchedule.linear()
    model = GaussianOracle(sched, mu, s)
    x0, probs = _discretized_data(mu, s, 200_000, seed=2)
    mean_d = (probs * GRID).sum().item()
    var_d = (probs * (GRID - mean_d) ** 2).sum().item()
    g = torch.Generator().manual_seed(3)
    for i in [1, 5, 50, 300, 999]:
        t = torch.full((x0.shape[0],), i)
        got = vlb_terms(model, sched, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64)).mean().item()
        a2, b2 = sched.alphas_cumprod[i], 1 - sched.alphas_cumprod[i]
        k = a2 * s**2 + b2
        err2 = b2**2 / k**2 * (var_d + (mean_d - mu) ** 2) + a2 * b2 * s**4 / k**2
        expected = sched.posterior_mean_coef1[i] ** 2 * err2 / (2 * sched.posterior_variance[i] * math.log(2))
        assert got == pytest.approx(expected, rel=0.02), f"t index {i}"


def _log_bin_mass(lo, hi, mean, sd):
    """log(Φ((hi−m)/sd) − Φ((lo−m)/sd)) via scipy's log-CDF, mirrored right of the mean for precision."""
    zl, zh = (lo - mean) / sd, (hi - mean) / sd
    right = zl > 0
    a, b = np.where(right, -zl, zh), np.where(right, -zh, zl)
    log_a = stats.norm.logcdf(a)
    with np.errstate(divide="ignore"):
        return log_a + np.log(-np.expm1(stats.norm.logcdf(b) - log_a))


def test_decoder_term_matches_quadrature():
    """L_0 = E_{x_0, ε} −log₂ P(x_0 | x̂_0(x_1), β̃_1) computed with Gauss–Hermite quadrature over ε."""
    mu, s = -0.2, 0.25
    sched = NoiseSchedule.linear()
    model = GaussianOracle(sched, mu, s)
    x0, probs = _discretized_data(mu, s, 200_000, seed=4)
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    got = vlb_terms(model, sched, x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(5),
                                                      dtype=torch.float64)).mean().item()
    a, b = math.sqrt(sched.alphas_cumprod[0]), math.sqrt(1 - sched.alphas_cumprod[0])
    sigma = math.sqrt(sched.posterior_variance[1])
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    grid, p = GRID.numpy(), probs.numpy()
    edges = np.concatenate([[-np.inf], grid[:-1] + 1 / 255, [np.inf]])
    expected = 0.0
    for u in np.nonzero(p > 1e-12)[0]:
        x1 = a * grid[u] + b * nodes
        eps_hat = b * (x1 - a * mu) / (a * a * s * s + b * b)
        x0_hat = (x1 - b * eps_hat) / a
        expected += p[u] * np.sum(weights * -_log_bin_mass(edges[u], edges[u + 1], x0_hat, sigma) / math.log(2))
    assert got == pytest.approx(expected, rel=0.01)


def test_elbo_of_exact_denoiser_bounds_the_true_nll():
    """E[−ELBO] ≥ H(data) for any model; with the exact denoiser the gap is the fixed-variance slack only."""
    mu, s = 0.0, 0.5
    sched = NoiseSchedule.linear()
    x0, probs = _discretized_data(mu, s, 4000, seed=6)
    entropy_bits = -(probs[probs > 0] * torch.log2(probs[probs > 0])).sum().item()
    out = nll_bpd(GaussianOracle(sched, mu, s), sched, x0, generator=torch.Generator().manual_seed(7))
    assert set(out) == {"total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd", "vb_per_t"}
    assert out["vb_per_t"].shape == (4000, 1000) and out["total_bpd"].shape == (4000,)
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb_bpd"] + out["decoder_bpd"])
    torch.testing.assert_close(out["decoder_bpd"], out["vb_per_t"][:, 0])
    total = out["total_bpd"].mean().item()
    stderr = out["total_bpd"].std().item() / math.sqrt(4000)
    assert total >= entropy_bits - 3 * stderr
    # Measured slack ≈ 0.9 bits/dim: σ_1 = √β̃_1 ≈ 0.007 spans about two 8-bit bins (bin half-width 1/255).
    assert total - entropy_bits < 1.2, (total, entropy_bits)


def test_elbo_of_a_poor_model_is_worse():
    sched = NoiseSchedule.linear(100)
    x0, _ = _discretized_data(0.0, 0.5, 500, seed=8)
    good = nll_bpd(GaussianOracle(sched, 0.0, 0.5), sched, x0, generator=torch.Generator().manual_seed(0))
    bad = nll_bpd(GaussianOracle(sched, 0.5, 0.1), sched, x0, generator=torch.Generator().manual_seed(0))
    assert bad["total_bpd"].mean() > good["total_bpd"].mean() + 0.5
