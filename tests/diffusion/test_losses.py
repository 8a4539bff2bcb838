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
from diffusion.parameterization import prediction_target
from diffusion.process import predict_x0
from diffusion.schedule import NoiseSchedule
from tests.diffusion.oracles import frac_from_log_variance
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


class LearnedVarianceOracle(torch.nn.Module):
    """The exact ε̂ for N(μ, s²) data answering in `prediction` units, plus variance channels that give Σ_θ = e^log_var[t]
    through eq. 15 (2C output channels)."""

    def __init__(self, sched, mu, s, log_var, prediction="eps"):
        super().__init__()
        self.sched, self.prediction = sched, prediction
        self.oracle = GaussianOracle(sched, mu, s)
        self.log_var = torch.as_tensor(log_var, dtype=torch.float64)

    def forward(self, x, t):
        eps = self.oracle(x, t)
        x0_hat = predict_x0(self.sched, x, t, eps)
        log_var = self.log_var[t].reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)
        return torch.cat([prediction_target(self.prediction, self.sched, x0_hat, eps, t),
                          frac_from_log_variance(self.sched, t, log_var)], dim=1)


def _x0_error(sched, mu, s, probs):
    """E(x_0 − x̂_0(x_t))² per index [T] for the oracle of N(μ, s²) on data with distribution `probs` over GRID:
    x̂_0 is linear in x_t, so only the data's mean and variance enter."""
    mean_d = (probs * GRID).sum().item()
    var_d = (probs * (GRID - mean_d) ** 2).sum().item()
    a2, b2 = sched.alphas_cumprod, 1 - sched.alphas_cumprod
    k = a2 * s**2 + b2
    return b2**2 / k**2 * (var_d + (mean_d - mu) ** 2) + a2 * b2 * s**4 / k**2, mean_d, var_d


def _optimal_variance(sched, mu, s, probs):
    """argmin_σ² E KL(q(x_{t−1} | x_t, x_0) ‖ N(μ_θ, σ²)) = β̃_t + coef1_t² E(x_0 − x̂_0)² (for t = 0: the decoder's
    continuous optimum E(x_0 − x̂_0)², since β̃ = 0 and coef1 = 1 there). → [T]."""
    err2, _, _ = _x0_error(sched, mu, s, probs)
    return sched.posterior_variance + sched.posterior_mean_coef1**2 * err2


def _exact_elbo_bits(sched, mu, s, probs, variance, decoder_sd):
    """E[L_T], E[Σ_{t≥1} L_{t−1}] (closed form for any per-t σ², `variance` [T]) and E[L_0] (Gauss–Hermite over ε,
    decoder N(x̂_0, decoder_sd²)) in bits, for the oracle of N(μ, s²) on data `probs`."""
    err2, mean_d, var_d = _x0_error(sched, mu, s, probs)
    post, coef1 = sched.posterior_variance[1:], sched.posterior_mean_coef1[1:]
    var = variance[1:]
    kl = 0.5 * (np.log(var / post) + (post + coef1**2 * err2[1:]) / var - 1) / math.log(2)
    abar_T = sched.alphas_cumprod[-1]
    prior = 0.5 * (-math.log(1 - abar_T) + (1 - abar_T) + abar_T * (var_d + mean_d**2) - 1) / math.log(2)
    a, b = math.sqrt(sched.alphas_cumprod[0]), math.sqrt(1 - sched.alphas_cumprod[0])
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    grid, p = GRID.numpy(), probs.numpy()
    edges = np.concatenate([[-np.inf], grid[:-1] + 1 / 255, [np.inf]])
    decoder = 0.0
    for u in np.nonzero(p > 1e-15)[0]:
        x1 = a * grid[u] + b * nodes
        x0_hat = (x1 - b * b * (x1 - a * mu) / (a * a * s * s + b * b)) / a
        decoder += p[u] * np.sum(weights * -_log_bin_mass(edges[u], edges[u + 1], x0_hat, decoder_sd)) / math.log(2)
    return prior, kl.sum(), decoder


def test_optimal_variance_of_gaussian_data_lies_between_beta_tilde_and_beta():
    """For N(μ, s²) data, σ*² = β̃_t + coef1² s²(1−ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t), and β_t − β̃_t = coef1² (1 − ᾱ_t): so
    β̃_t ≤ σ*² ≤ β_t whenever s ≤ 1, i.e. eq. 15's v_Σ ∈ [−1, 1] reaches the optimum."""
    sched = NoiseSchedule.linear()
    abar = sched.alphas_cumprod
    np.testing.assert_allclose(sched.betas[1:] - sched.posterior_variance[1:],
                               sched.posterior_mean_coef1[1:] ** 2 * (1 - abar[1:]), rtol=1e-9)
    t = torch.arange(1, 1000)
    for s in [0.05, 0.3, 1.0]:
        optimal = sched.posterior_variance + sched.posterior_mean_coef1**2 * s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
        v = frac_from_log_variance(sched, t, torch.log(torch.tensor(optimal[1:])))
        assert v.min() >= -1 - 1e-9 and v.max() <= 1 + 1e-6, (s, v.min(), v.max())


@pytest.mark.parametrize("mu, s", [(0.0, 0.15), (0.0, 0.5)])
def test_elbo_with_the_optimal_learned_variance_is_between_the_true_nll_and_the_fixed_variance_elbos(mu, s):
    """With the exact mean, Σ_θ set to the per-t optimum through the model's variance channels (eq. 15):
    exact expectations (closed-form KL terms, quadrature decoder) satisfy H(data) ≤ ELBO(Σ*) ≤ ELBO(β) ≤ ELBO(β̃),
    and nll_bpd's Monte-Carlo estimates match them (paired over the same noise, the differences tightly)."""
    sched = NoiseSchedule.from_name("linear", 200)
    x0, probs = _discretized_data(mu, s, 4000, seed=6)
    entropy_bits = -(probs[probs > 0] * torch.log2(probs[probs > 0])).sum().item()
    optimal = _optimal_variance(sched, mu, s, probs)
    post, betas = sched.posterior_variance, sched.betas
    fixed_decoder_sd = math.sqrt(post[1])  # both fixed choices use β̃ at index 1 for the decoder
    exact = {
        "small": _exact_elbo_bits(sched, mu, s, probs, post, fixed_decoder_sd),
        "large": _exact_elbo_bits(sched, mu, s, probs, betas, fixed_decoder_sd),
        "learned": _exact_elbo_bits(sched, mu, s, probs, optimal, math.sqrt(optimal[0])),
    }
    total = {k: sum(v) for k, v in exact.items()}
    assert entropy_bits <= total["learned"] < total["large"] < total["small"], (entropy_bits, total)
    # Measured: learned − H ≈ 4e-5 (s = 0.15) and 0.12 (s = 0.5, mass piles up in the open-ended edge bins);
    # large − learned ≈ 0.14 and 0.08 bits/dim.

    out = {
        "small": nll_bpd(GaussianOracle(sched, mu, s), sched, x0, "small", generator=torch.Generator().manual_seed(7)),
        "large": nll_bpd(GaussianOracle(sched, mu, s), sched, x0, "large", generator=torch.Generator().manual_seed(7)),
        "learned": nll_bpd(LearnedVarianceOracle(sched, mu, s, np.log(optimal)), sched, x0, learn_variance=True,
                           generator=torch.Generator().manual_seed(7)),
    }
    n = x0.shape[0]
    for name, terms in out.items():
        for key, expected in zip(("prior_bpd", "vb_bpd", "decoder_bpd"), exact[name]):
            got = terms[key]
            assert abs(got.mean().item() - expected) < 4 * got.std().item() / math.sqrt(n) + 1e-6, (name, key)
    for fixed in ("small", "large"):
        diff = out["learned"]["total_bpd"] - out[fixed]["total_bpd"]
        expected = total["learned"] - total[fixed]
        assert abs(diff.mean().item() - expected) < 4 * diff.std().item() / math.sqrt(n), (fixed, diff.mean(), expected)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_nll_bpd_reads_every_prediction_type_the_same(prediction):
    """The same denoiser answering in x0 or v units (with its variance channels) gives the bound of the ε form."""
    sched = NoiseSchedule.from_name("linear", 50)
    x0, probs = _discretized_data(0.1, 0.3, 256, seed=9)
    log_var = np.log(_optimal_variance(sched, 0.1, 0.3, probs))
    ref = nll_bpd(LearnedVarianceOracle(sched, 0.1, 0.3, log_var, "eps"), sched, x0, learn_variance=True,
                  generator=torch.Generator().manual_seed(1))
    got = nll_bpd(LearnedVarianceOracle(sched, 0.1, 0.3, log_var, prediction), sched, x0, prediction=prediction,
                  learn_variance=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got["vb_per_t"], ref["vb_per_t"], rtol=1e-9, atol=1e-9)
