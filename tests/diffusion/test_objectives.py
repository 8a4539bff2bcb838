import io
import math

import numpy as np
import pytest
import torch

from diffusion.losses import l_simple, nll_bpd, prior_bpd, vlb_terms
from diffusion.objectives import (
    HYBRID_LAMBDA,
    ImportanceSampler,
    min_snr_weight,
    training_losses,
)
from diffusion.parameterization import prediction_target
from diffusion.process import predict_x0, q_sample
from diffusion.schedule import NoiseSchedule, rescale_zero_terminal_snr, snr, spaced_timesteps
from tests.diffusion.oracles import GaussianOracle, discretized_gaussian_probs

SCHED = NoiseSchedule.linear()
GRID = torch.linspace(-1, 1, 256, dtype=torch.float64)


class FixedOutput(torch.nn.Module):
    """A 'network' whose output is one leaf tensor, so gradients w.r.t. the output are read off directly."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = torch.nn.Parameter(output)

    def forward(self, x, t):
        return self.output


class OracleWithVariance(torch.nn.Module):
    """The exact ε̂ for N(μ, s²) plus constant variance channels v_Σ (2C outputs)."""

    def __init__(self, sched, mu, s, v=0.0):
        super().__init__()
        self.oracle, self.v = GaussianOracle(sched, mu, s), v

    def forward(self, x, t):
        return torch.cat([self.oracle(x, t), torch.full_like(x, self.v)], dim=1)


def _batch(seed=0, shape=(6, 2, 3, 3), t=(0, 1, 10, 300, 700, 999)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    output = torch.randn((shape[0], 2 * shape[1], *shape[2:]), generator=g, dtype=torch.float64)
    return x0, noise, torch.tensor(t), output


def _discretized_data(mu, s, n, seed):
    probs = discretized_gaussian_probs(mu, s)
    idx = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return GRID[idx].reshape(n, 1)


# ---- L_hybrid: stop-gradient on the mean ----------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_hybrid_gradient_through_the_mean_half_is_exactly_l_simples(prediction, weighting):
    """∂/∂f of mean_b w_b ‖f_b − target_b‖²/D is 2 w_b (f_b − target_b)/(B D); λ·T·L_t adds nothing to it."""
    x0, noise, t, output = _batch()
    model = FixedOutput(output.clone())
    terms = training_losses(model, SCHED, x0, t, noise, objective="l_hybrid", prediction=prediction,
                            learn_variance=True, loss_weighting=weighting)
    terms["loss"].mean().backward()
    c = x0.shape[1]
    target = prediction_target(prediction, SCHED, x0, noise, t)
    w = torch.ones(6, dtype=torch.float64) if weighting == "none" else min_snr_weight(SCHED, t, prediction, dtype=torch.float64)
    expected = 2 * w.reshape(-1, 1, 1, 1) * (output[:, :c] - target) / x0.numel()
    torch.testing.assert_close(model.output.grad[:, :c], expected, rtol=1e-12, atol=1e-15)
    grad_var = model.output.grad[:, c:]
    assert torch.isfinite(grad_var).all() and (grad_var.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_hybrid_mean_gradient_equals_losses_l_simple_and_l_vlb_does_not_stop_it():
    x0, noise, t, output = _batch(seed=1)
    c = x0.shape[1]
    hybrid = FixedOutput(output.clone())
    training_losses(hybrid, SCHED, x0, t, noise, objective="l_hybrid", learn_variance=True)["loss"].mean().backward()
    simple = FixedOutput(output[:, :c].clone())
    l_simple(simple, SCHED, x0, t, noise).backward()
    # losses.l_simple squares in float32: agreement to float32 rounding of gradients of size ~1/54.
    torch.testing.assert_close(hybrid.output.grad[:, :c], simple.output.grad, rtol=1e-5, atol=1e-8)
    vlb = FixedOutput(output.clone())
    training_losses(vlb, SCHED, x0, t, noise, objective="l_vlb", learn_variance=True)["loss"].mean().backward()
    assert (vlb.output.grad[:, :c].abs().sum(dim=(1, 2, 3)) > 0).all()


def test_loss_values_are_their_definitions():
    """l_simple = ‖ε − ε̂‖²/D, l_vlb = T · L_t (the same L_t as losses.vlb_terms), l_hybrid = mse + λ T L_t."""
    sched = NoiseSchedule.from_name("linear", 100)
    x0 = _discretized_data(0.1, 0.3, 64, seed=0).reshape(16, 1, 2, 2)
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = OracleWithVariance(sched, 0.1, 0.3, v=0.4)
    vb = vlb_terms(model, sched, x0, t, noise, learn_variance=True)
    vlb = training_losses(model, sched, x0, t, noise, objective="l_vlb", learn_variance=True)
    torch.testing.assert_close(vlb["loss"], 100 * vb, rtol=1e-12, atol=0)
    hybrid = training_losses(model, sched, x0, t, noise, objective="l_hybrid", learn_variance=True)
    torch.testing.assert_close(hybrid["vb"], vb, rtol=1e-12, atol=0)
    torch.testing.assert_close(hybrid["loss"], hybrid["mse"] + HYBRID_LAMBDA * 100 * vb, rtol=1e-12, atol=0)
    simple = training_losses(model.oracle, sched, x0, t, noise)
    assert set(simple) == {"loss", "mse"}
    torch.testing.assert_close(simple["loss"].mean(), l_simple(model.oracle, sched, x0, t, noise).double())
    fixed = training_losses(model.oracle, sched, x0, t, noise, objective="l_vlb", variance="large")
    torch.testing.assert_close(fixed["loss"], 100 * vlb_terms(model.oracle, sched, x0, t, noise, "large"))
    weights = torch.linspace(0.5, 2.0, 16)
    weighted = training_losses(model, sched, x0, t, noise, weights=weights, objective="l_vlb", learn_variance=True)
    torch.testing.assert_close(weighted["loss"], vlb["loss"] * weights.double())


def test_meaningless_combinations_fail_loudly():
    x0, noise, t, output = _batch()
    model = FixedOutput(output)
    with pytest.raises(ValueError, match="learn_variance needs objective"):
        training_losses(model, SCHED, x0, t, noise, learn_variance=True)
    with pytest.raises(ValueError, match="l_hybrid needs learn_variance"):
        training_losses(model, SCHED, x0, t, noise, objective="l_hybrid")
    with pytest.raises(ValueError, match="not to l_vlb"):
        training_losses(model, SCHED, x0, t, noise, objective="l_vlb", learn_variance=True, loss_weighting="min_snr")
    with pytest.raises(ValueError, match="unknown objective"):
        training_losses(model, SCHED, x0, t, noise, objective="l_kl")
    with pytest.raises(ValueError, match="unknown loss_weighting"):
        training_losses(model, SCHED, x0, t, noise, objective="l_vlb", learn_variance=True, loss_weighting="p2")


# ---- min-SNR-γ --------------------------------------------------------------------------------------------------------

def test_min_snr_weights_equal_their_closed_forms():
    t = torch.arange(1000)
    abar = SCHED.alphas_cumprod
    s = abar / (1 - abar)
    np.testing.assert_allclose(snr(SCHED, t, torch.float64).numpy(), s, rtol=1e-14)
    expected = {"eps": np.minimum(s, 5) / s, "x0": np.minimum(s, 5), "v": np.minimum(s, 5) / (s + 1)}
    for prediction, w in expected.items():
        np.testing.assert_allclose(min_snr_weight(SCHED, t, prediction, dtype=torch.float64).numpy(), w, rtol=1e-14)
    np.testing.assert_allclose(min_snr_weight(SCHED, t, "v", gamma=1.0, dtype=torch.float64).numpy(), np.minimum(s, 1) / (s + 1), rtol=1e-14)
    # The v weight is the ε weight times SNR/(SNR + 1) at every t, never equal to it: reusing the ε formula for v
    # over-weights the noisy steps (by 2× where SNR = 1, by 1/SNR where SNR → 0).
    v, eps = (min_snr_weight(SCHED, t, p, dtype=torch.float64).numpy() for p in ("v", "eps"))
    np.testing.assert_allclose(v / eps, s / (s + 1), rtol=1e-13)
    assert np.all(v < eps)
    mid = int(np.argmin(np.abs(s - 1)))
    assert eps[mid] == 1.0 and v[mid] == pytest.approx(0.5, abs=0.01)
    assert eps[999] == 1.0 and v[999] == pytest.approx(s[999], rel=1e-4)


def test_min_snr_weights_give_the_same_x0_space_loss_for_every_prediction_type():
    """Hang et al.: the loss is min(SNR, γ) ‖x_0 − x̂_0‖² whatever the network predicts."""
    x0, noise, t, _ = _batch(seed=3)
    g = torch.Generator().manual_seed(4)
    eps_hat = noise + 0.3 * torch.randn(noise.shape, generator=g, dtype=torch.float64)
    x_t = q_sample(SCHED, x0, t, noise)
    x0_hat = predict_x0(SCHED, x_t, t, eps_hat)
    x0_loss = (x0 - x0_hat).pow(2).mean(dim=(1, 2, 3)) * torch.clamp(snr(SCHED, t, torch.float64), max=5.0)
    for prediction in ["eps", "x0", "v"]:
        model = FixedOutput(prediction_target(prediction, SCHED, x0_hat, eps_hat, t))
        got = training_losses(model, SCHED, x0, t, noise, prediction=prediction, loss_weighting="min_snr")["loss"]
        torch.testing.assert_close(got, x0_loss, rtol=1e-9, atol=0)


def test_min_snr_at_zero_terminal_snr_is_finite():
    sched = rescale_zero_terminal_snr(SCHED)
    t = torch.tensor([998, 999])
    assert min_snr_weight(sched, t, "eps").tolist()[1] == 1.0
    assert min_snr_weight(sched, t, "v").tolist()[1] == 0.0 and min_snr_weight(sched, t, "x0").tolist()[1] == 0.0


# ---- zero-terminal SNR ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [NoiseSchedule.linear(), NoiseSchedule.cosine(1000), NoiseSchedule.linear(50)])
def test_zero_terminal_snr_rescaling(base):
    sched = rescale_zero_terminal_snr(base)
    assert sched.alphas_cumprod[-1] == 0.0 and sched.betas[-1] == 1.0
    assert sched.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0], rel=1e-14)
    assert np.all((sched.betas > 0) & (sched.betas <= 1))
    # √ᾱ' = k (√ᾱ − √ᾱ_{T−1}) with k = √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}): affine, and the rescaled schedule's own ᾱ.
    old, new = np.sqrt(base.alphas_cumprod), np.sqrt(sched.alphas_cumprod)
    k = old[0] / (old[0] - old[-1])
    np.testing.assert_allclose(new, k * (old - old[-1]), rtol=1e-12, atol=1e-15)
    slope, intercept = np.polyfit(old, new, 1)
    assert slope == pytest.approx(k, rel=1e-10) and intercept == pytest.approx(-k * old[-1], rel=1e-8)
    # q(x_T | x_0) = N(0, I) for every x_0: the prior term L_T vanishes exactly.
    x0 = torch.linspace(-1, 1, 9, dtype=torch.float64).reshape(9, 1)
    assert torch.equal(prior_bpd(sched, x0), torch.zeros(9, dtype=torch.float64))
    # Trailing spacing keeps the terminal step, so a sampler on it starts from SNR 0.
    n = min(10, base.num_timesteps)
    with np.errstate(divide="ignore"):  # the respaced schedule's 1/ᾱ at SNR 0
        assert sched.respace(spaced_timesteps(base.num_timesteps, n, "trailing")).alphas_cumprod[-1] == 0.0
    with pytest.raises(ValueError, match="then respace"):
        rescale_zero_terminal_snr(base.respace(spaced_timesteps(base.num_timesteps, n, "linspace")))


def test_v_prediction_losses_are_finite_at_the_terminal_step():
    sched = rescale_zero_terminal_snr(NoiseSchedule.linear(100))
    x0, noise, _, output = _batch(seed=5, t=(99,) * 6)
    t = torch.full((6,), 99)
    terms = training_losses(FixedOutput(output), sched, x0, t, noise, objective="l_hybrid", prediction="v",
                            learn_variance=True, loss_weighting="min_snr")
    assert all(torch.isfinite(v).all() for v in terms.values())


# ---- importance sampling of t -----------------------------------------------------------------------------------------

def test_importance_sampler_is_uniform_until_every_t_has_ten_losses():
    sampler = ImportanceSampler(5)
    for _ in range(9):
        sampler.update(torch.arange(5), torch.arange(5.0) + 1)
    sampler.update(torch.arange(4), torch.ones(4))
    assert not sampler.warmed_up
    np.testing.assert_array_equal(sampler.probabilities(), np.full(5, 0.2))
    t, w = sampler.sample(100, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and torch.equal(w, torch.ones(100))
    sampler.update(torch.tensor([4]), torch.tensor([5.0]))
    assert sampler.warmed_up


def test_importance_sampler_probabilities_follow_the_root_mean_square_of_the_last_ten():
    T, u = 4, 0.001
    sampler = ImportanceSampler(T, uniform_prob=u)
    for _ in range(10):  # overwritten below: only the last ten values per t count
        sampler.update(torch.arange(T), torch.full((T,), 100.0))
    history = torch.tensor([[1.0, 2.0, 3.0, 4.0]]) * torch.arange(1, 11).reshape(10, 1) / 10  # [10, T]
    for row in history:
        sampler.update(torch.arange(T), row)
    rms = np.sqrt((history.double().numpy() ** 2).mean(axis=0))
    expected = rms / rms.sum() * (1 - u) + u / T
    np.testing.assert_allclose(sampler.probabilities(), expected, rtol=1e-14)
    t, w = sampler.sample(1000, torch.Generator().manual_seed(1), dtype=torch.float64)
    np.testing.assert_allclose(w.numpy(), 1 / (T * expected[t.numpy()]), rtol=1e-14)


def test_importance_weights_are_exactly_unbiased():
    """E_{t∼p}[w_t T L_t] = Σ_t p_t · 1/(T p_t) · T L_t = Σ_t L_t, for any warmed-up history."""
    T = 50
    sampler = ImportanceSampler(T)
    g = torch.Generator().manual_seed(2)
    losses = torch.rand(T, generator=g, dtype=torch.float64) ** 4 * 10
    for _ in range(10):
        sampler.update(torch.arange(T), losses * (1 + 0.1 * torch.randn(T, generator=g, dtype=torch.float64)))
    p = sampler.probabilities()
    assert p.max() / p.min() > 100
    assert np.sum(p * (1 / (T * p)) * T * losses.numpy()) == pytest.approx(losses.sum().item(), rel=1e-13)


def test_importance_sampled_vlb_has_the_uniform_t_mean_and_less_variance():
    """On real L_t of the exact denoiser (learned variance channels at v_Σ = 0): the mean of w · T · L_t over many
    importance-sampled draws equals the bound Σ_t E L_t that nll_bpd computes at every t, and its spread is smaller
    than uniform t's."""
    sched = NoiseSchedule.from_name("linear", 50)
    model = OracleWithVariance(sched, 0.1, 0.3)
    data = _discretized_data(0.1, 0.3, 8_000, seed=3)
    reference = nll_bpd(model, sched, data, learn_variance=True, generator=torch.Generator().manual_seed(4))
    bound = reference["vb_per_t"].sum(dim=1).mean().item()  # Σ_t E L_t (L_0 and the KL terms), uniform weights

    sampler = ImportanceSampler(50)
    g = torch.Generator().manual_seed(5)
    while not sampler.warmed_up:
        t = torch.randint(0, 50, (64,), generator=g)
        x0 = data[torch.randint(0, 8_000, (64,), generator=g)]
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        sampler.update(t, vlb_terms(model, sched, x0, t, noise, learn_variance=True))
    p = sampler.probabilities()
    assert p.max() / p.min() > 5  # L_0 (bits) dwarfs the late KL terms: far from uniform

    estimates, uniform = [], []
    for _ in range(200):
        t, w = sampler.sample(100, g, dtype=torch.float64)
        x0 = data[torch.randint(0, 8_000, (100,), generator=g)]
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        estimates.append(w * 50 * vlb_terms(model, sched, x0, t, noise, learn_variance=True))
        t = torch.randint(0, 50, (100,), generator=g)
        uniform.append(50 * vlb_terms(model, sched, x0, t, noise, learn_variance=True))
    estimates, uniform = torch.cat(estimates), torch.cat(uniform)
    stderr = estimates.std().item() / math.sqrt(estimates.numel())
    ref_stderr = reference["vb_per_t"].sum(dim=1).std().item() / math.sqrt(8_000)
    assert abs(estimates.mean().item() - bound) < 4 * math.hypot(stderr, ref_stderr), (estimates.mean(), bound)
    assert estimates.std() < 0.7 * uniform.std()


def test_importance_sampler_state_round_trips_through_torch_save():
    sampler = ImportanceSampler(8, uniform_prob=0.01)
    g = torch.Generator().manual_seed(6)
    for _ in range(12):
        sampler.update(torch.arange(8), torch.rand(8, generator=g))
    sampler.update(torch.tensor([3, 3]), torch.tensor([7.0, 9.0]))
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    restored = ImportanceSampler(8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    np.testing.assert_array_equal(restored.probabilities(), sampler.probabilities())
    a = sampler.sample(32, torch.Generator().manual_seed(7))
    b = restored.sample(32, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sampler.update(torch.tensor([0]), torch.tensor([5.0]))
    restored.update(torch.tensor([0]), torch.tensor([5.0]))
    np.testing.assert_array_equal(restored.probabilities(), sampler.probabilities())
    with pytest.raises(ValueError, match="history"):
        ImportanceSampler(9).load_state_dict(sampler.state_dict())
