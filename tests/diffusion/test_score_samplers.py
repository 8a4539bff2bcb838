"""The score view against closed forms: ε ↔ score, the VP SDE time, Langevin invariance, the reverse-SDE and
predictor–corrector samplers against the exact law of their update rules, the probability-flow ODE solvers against
the exact ODE flow of Gaussian data (and their order of convergence), and honest model-call counts."""

import math

import numpy as np
import pytest
import torch

from diffusion.sampler_specs import SAMPLER_NAMES, sampler_spec
from diffusion.samplers import SAMPLERS, Denoised, ddim_step, ddpm_step, ode_euler_step, reverse_sde_step, sample
from diffusion.schedule import NoiseSchedule, logsnr_timesteps
from diffusion.score import eps_from_score, langevin_step, score_from_eps
from tests.diffusion.oracles import GaussianOracle, sde_time

MU, S = 0.3, 0.15
SCHED = NoiseSchedule.linear()


def gaussian_score(x, abar):
    """∇ log N(x; √ᾱ μ, ᾱ s² + 1 − ᾱ)."""
    return -(x - math.sqrt(abar) * MU) / (abar * S * S + 1 - abar)


def eps_coefficients(abar):
    """The oracle's ε̂ = k x + c at noise level ᾱ (affine for Gaussian data)."""
    a, b = math.sqrt(abar), math.sqrt(1 - abar)
    k = b / (abar * S * S + 1 - abar)
    return k, -k * a * MU


def flow(x_T, abar_T, abar):
    """The exact probability-flow ODE map for Gaussian data: quantiles are kept from level ᾱ_T to level ᾱ."""
    v = lambda ab: ab * S * S + 1 - ab  # noqa: E731
    return math.sqrt(abar) * MU + math.sqrt(v(abar) / v(abar_T)) * (x_T - math.sqrt(abar_T) * MU)


def run(name, sched, x_T, steps, generator=None, stop_before_last=False, **options):
    """Advance a sampler one model call at a time with the Gaussian oracle; optionally stop before its final step
    (the one that lands on σ = 0)."""
    impl, model = SAMPLERS[name], GaussianOracle(SCHED, MU, S)
    state = impl.start(sched, x_T, steps, **options)
    while not state.done:
        if stop_before_last and state.nfe == impl.total_calls(state) - 1:  # state.x: the last call's input
            break
        x, t = impl.model_input(state)
        impl.step(state, Denoised(model(x, torch.full((x.shape[0],), t))), generator)
    return state


def test_score_and_eps_are_the_same_prediction():
    model = GaussianOracle(SCHED, MU, S)
    x = torch.randn(6, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for i in (0, 10, 500, 999):
        eps = model(x, torch.full((6,), i))
        torch.testing.assert_close(score_from_eps(SCHED, eps, i), gaussian_score(x, SCHED.alphas_cumprod[i]))
        torch.testing.assert_close(eps_from_score(SCHED, score_from_eps(SCHED, eps, i), i), eps)
    t = torch.tensor([0, 3, 400, 999, 7, 50])
    eps = model(x, t)
    expected = torch.stack([gaussian_score(x[k], SCHED.alphas_cumprod[int(t[k])]) for k in range(6)])
    torch.testing.assert_close(score_from_eps(SCHED, eps, t), expected)
    torch.testing.assert_close(eps_from_score(SCHED, score_from_eps(SCHED, eps, t), t), eps)


def test_sde_time_is_minus_log_alphas_cumprod_to_second_order():
    tau = sde_time(SCHED)
    gap = np.abs(-np.log(SCHED.alphas_cumprod) - tau)  # −log(1 − β) − β ∈ [β²/2, β²] for β ≤ ½
    assert np.all(gap <= np.cumsum(SCHED.betas**2)) and np.all(gap >= 0.5 * np.cumsum(SCHED.betas**2) - 1e-15)
    assert tau[0] == SCHED.betas[0] and tau[-1] == pytest.approx(10.05, abs=1e-9)  # Σ linspace(1e-4, 0.02, 1000)


@pytest.mark.parametrize("steps", [1000, 25])
def test_reverse_sde_step_is_ddpm_large_variance_and_songs_predictor_to_first_order(steps):
    sched = SAMPLERS["sde"].start(SCHED, torch.zeros(1, 1), steps).sched
    g = torch.Generator().manual_seed(1)
    for i in (0, 1, steps // 2, steps - 1):
        x, eps, z = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
        ours = reverse_sde_step(sched, eps, x, i, z)
        torch.testing.assert_close(ours, ddpm_step(sched, eps, x, i, z, "large", clip_x0=False), rtol=0, atol=1e-12)
        if i > 0 and steps == 1000:
            beta, s = float(sched.betas[i]), score_from_eps(sched, eps, i)
            song = (2 - math.sqrt(1 - beta)) * x + beta * s + math.sqrt(beta) * z
            assert torch.all((ours - song).abs() <= beta**2 * (0.26 * x.abs() + 0.51 * s.abs()) + 1e-15)


def test_langevin_at_a_fixed_level_keeps_its_marginal():
    """Unadjusted Langevin with the exact score of N(m, v) and step δ has the stationary law N(m, v / (1 − δ/2v));
    started from N(m, v) it stays there up to that O(δ) bias."""
    abar = float(SCHED.alphas_cumprod[300])
    m, v = math.sqrt(abar) * MU, abar * S * S + 1 - abar
    delta, n = 0.02 * v, 200000
    g = torch.Generator().manual_seed(2)
    x = m + math.sqrt(v) * torch.randn(n, dtype=torch.float64, generator=g)
    for _ in range(300):
        x = langevin_step(x, gaussian_score(x, abar), delta, torch.randn(n, dtype=torch.float64, generator=g))
    stationary = v / (1 - delta / (2 * v))
    assert x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
    assert x.var().item() == pytest.approx(stationary, rel=0.01)
    assert x.var().item() == pytest.approx(v, rel=0.03)


def _sde_law(sched, m, v, corrector_steps=0, snr=0.0):
    """Mean and variance of one dimension's output of sde (corrector_steps = 0) or pc: each step is affine in x given
    the oracle's affine ε̂; the corrector's SNR step uses the expected norms (high-dimensional images)."""
    for i in reversed(range(sched.num_timesteps)):
        abar, beta = float(sched.alphas_cumprod[i]), float(sched.betas[i])
        k, c = eps_coefficients(abar)
        b = math.sqrt(1 - abar)
        for _ in range(corrector_steps):  # score = −ε̂/b;  E‖z‖² / E‖s‖² per dimension
            delta = 2 * (1 - beta) * snr**2 * b * b / ((k * m + c) ** 2 + k * k * v)
            A = 1 - delta * k / b
            m, v = A * m - delta * c / b, A * A * v + 2 * delta
        A = (1 - beta * k / b) / math.sqrt(1 - beta)
        m, v = A * m - beta * c / (b * math.sqrt(1 - beta)), A * A * v + (beta if i > 0 else 0.0)
    return m, v


@pytest.mark.parametrize("name, steps, options", [
    ("sde", 1000, {}), ("sde", 20, {}), ("pc", 1000, {}), ("pc", 30, {"corrector_steps": 2, "snr": 0.1}),
])
def test_stochastic_samplers_follow_the_exact_law_of_their_update_rule(name, steps, options):
    n, shape = 120, (120, 1, 16, 16)  # 30,720 values; pc's step size needs image-sized examples
    x_T = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    state = run(name, SCHED, x_T, steps, torch.Generator().manual_seed(4), **options)
    resolved = sampler_spec(name).resolve(options)
    m, v = _sde_law(state.sched, 0.0, 1.0, resolved.get("corrector_steps", 0), resolved.get("snr", 0.0))
    total = n * 256
    assert state.x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / total))
    assert state.x.std().item() == pytest.approx(math.sqrt(v), rel=0.03)
    if steps == 1000:  # the reverse SDE at every step reproduces the data
        assert state.x.mean().item() == pytest.approx(MU, abs=0.005)
        assert state.x.std().item() == pytest.approx(S, rel=0.04)


def _deterministic_map(name, sched):
    """(A, c) with output = A x_T + c, from the update rules written out per sampler for one dimension."""
    A, c = 1.0, 0.0
    last = None  # dpmpp-2m: (A, c) of the previous x̂_0 and its log-SNR step
    for i in reversed(range(sched.num_timesteps)):
        abar, abar_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
        sig, sig_prev = math.sqrt((1 - abar) / abar), math.sqrt((1 - abar_prev) / abar_prev)
        k, e = eps_coefficients(abar)
        eps = (k * A, k * c + e)
        if name == "ode-euler" or (name == "ode-heun" and i == 0):
            A, c = (math.sqrt(abar_prev) * (A / math.sqrt(abar) + (sig_prev - sig) * eps[0]),
                    math.sqrt(abar_prev) * (c / math.sqrt(abar) + (sig_prev - sig) * eps[1]))
        elif name == "ode-heun":
            pA = math.sqrt(abar_prev) * (A / math.sqrt(abar) + (sig_prev - sig) * eps[0])
            pc = math.sqrt(abar_prev) * (c / math.sqrt(abar) + (sig_prev - sig) * eps[1])
            k2, e2 = eps_coefficients(abar_prev)
            avg = ((eps[0] + k2 * pA) / 2, (eps[1] + k2 * pc + e2) / 2)
            A, c = (math.sqrt(abar_prev) * (A / math.sqrt(abar) + (sig_prev - sig) * avg[0]),
                    math.sqrt(abar_prev) * (c / math.sqrt(abar) + (sig_prev - sig) * avg[1]))
        else:  # dpmpp-2m
            x0 = ((A - math.sqrt(1 - abar) * eps[0]) / math.sqrt(abar), (c - math.sqrt(1 - abar) * eps[1]) / math.sqrt(abar))
            if abar_prev == 1.0:
                A, c = x0
                continue
            lam = lambda ab: 0.5 * math.log(ab / (1 - ab))  # noqa: E731
            h = lam(abar_prev) - lam(abar)
            d = x0
            if last is not None:
                r = last[1] / h
                d = ((1 + 0.5 / r) * x0[0] - 0.5 / r * last[0][0], (1 + 0.5 / r) * x0[1] - 0.5 / r * last[0][1])
            ratio, scale = math.sqrt((1 - abar_prev) / (1 - abar)), -math.sqrt(abar_prev) * math.expm1(-h)
            A, c = ratio * A + scale * d[0], ratio * c + scale * d[1]
            last = (x0, h)
    return A, c


@pytest.mark.parametrize("name, steps", [("ode-euler", 10), ("ode-heun", 8), ("ode-heun", 50), ("dpmpp-2m", 6),
                                         ("dpmpp-2m", 20)])
def test_ode_solvers_are_the_affine_map_of_their_update_rule(name, steps):
    x_T = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(13, 1)
    options = {"clip_x0": False} if name == "dpmpp-2m" else {}
    state = run(name, SCHED, x_T, steps, **options)
    A, c = _deterministic_map(name, state.sched)
    torch.testing.assert_close(state.x, A * x_T + c, rtol=1e-9, atol=1e-9)


def test_ode_euler_is_ddim_at_eta_zero_without_clipping():
    sched = SAMPLERS["ode-euler"].start(SCHED, torch.zeros(1, 1), 30).sched
    g = torch.Generator().manual_seed(5)
    for i in (0, 1, 15, 29):
        x, eps = (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
        torch.testing.assert_close(ode_euler_step(sched, eps, x, i), ddim_step(sched, eps, x, i, 0.0, clip_x0=False),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, order", [("ode-euler", 1), ("ode-heun", 2), ("dpmpp-2m", 2)])
def test_ode_solvers_converge_at_their_order(name, order):
    """Error at the last noise level before σ = 0 against the exact flow; halving the step divides it by 2^order."""
    x_T = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1)
    options = {"clip_x0": False} if name == "dpmpp-2m" else {}
    errors = []
    for n in (20, 40, 80):
        state = run(name, SCHED, x_T, n, stop_before_last=True, **options)
        exact = flow(x_T, float(SCHED.alphas_cumprod[-1]), float(state.sched.alphas_cumprod[0]))
        errors.append((state.x - exact).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(0.8 * 2**order <= r <= 1.25 * 2**order for r in ratios), (errors, ratios)


@pytest.mark.parametrize("name, steps", [("ode-heun", 50), ("dpmpp-2m", 50), ("dpmpp-2m", 10)])
def test_second_order_solvers_reproduce_the_data(name, steps):
    options = {"clip_x0": False} if name == "dpmpp-2m" else {}
    x = sample(GaussianOracle(SCHED, MU, S), SCHED, (20000, 1), sampler=name, steps=steps,
               generator=torch.Generator().manual_seed(6), **options)
    assert x.mean().item() == pytest.approx(MU, abs=0.003)
    assert x.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_model_calls_are_counted_honestly(name):
    calls, seen = [], []

    def counting(x, t):
        seen.append(int(t[0]))
        return GaussianOracle(SCHED, MU, S)(x, t)

    options = {"corrector_steps": 2} if name == "pc" else {}
    sample(counting, SCHED, (2, 1, 4, 4), sampler=name, steps=10, generator=torch.Generator().manual_seed(7),
           progress=lambda k, n: calls.append((k, n)), **options)
    expected = {"pc": 30, "ode-heun": 19}.get(name, 10)
    assert len(seen) == expected == sampler_spec(name).model_calls(10, options)
    assert calls == [(k, expected) for k in range(1, expected + 1)]


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_is_deterministic_given_its_seed(name):
    def draw(seed):
        return sample(GaussianOracle(SCHED, MU, S), SCHED, (2, 1, 4, 4), sampler=name, steps=6,
                      generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(1), draw(1), rtol=0, atol=0)
    assert not torch.equal(draw(1), draw(2))


def test_logsnr_grid_is_uniform_in_log_snr_where_the_indices_allow():
    lam = 0.5 * np.log(SCHED.alphas_cumprod / (1 - SCHED.alphas_cumprod))
    for n in (5, 10, 20, 50, 200):
        steps = logsnr_timesteps(SCHED, n)
        assert len(steps) == n and steps[0] == 0 and steps[-1] == 999 and np.all(np.diff(steps) > 0)
    steps = logsnr_timesteps(SCHED, 10)
    gaps = -np.diff(lam[steps])
    assert gaps.max() / gaps.min() < 1.3  # 10 points: no collisions, each within rounding of (λ_0 − λ_999) / 9
