import math

import numpy as np
import pytest
import torch

from diffusion.parameterization import (
    eps_from_v,
    log_variance_from_frac,
    model_prediction,
    prediction_target,
    v_from_eps_x0,
    x0_from_v,
)
from diffusion.process import eps_from_x0, q_sample, x0_from_eps
from diffusion.schedule import NoiseSchedule, rescale_zero_terminal_snr
from tests.diffusion.oracles import EpsModel, frac_from_log_variance
from tests.diffusion.oracles import GaussianOracle

SCHED = NoiseSchedule.linear()
T_IDX = torch.tensor([0, 1, 10, 250, 500, 998, 999])


def _data(seed=0, shape=(7, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps, q_sample(SCHED, x0, T_IDX, eps)


def _abar(t=T_IDX, sched=SCHED):
    return sched.to_tensor("alphas_cumprod", t, 4, torch.float64)


def test_v_is_the_salimans_ho_velocity():
    """v = √ᾱ ε − √(1−ᾱ) x_0 = dx_t/dφ for x_t = cos φ · x_0 + sin φ · ε."""
    x0, eps, _ = _data()
    phi = torch.atan2((1 - _abar()).sqrt(), _abar().sqrt())
    torch.testing.assert_close(v_from_eps_x0(eps, x0, _abar()), -torch.sin(phi) * x0 + torch.cos(phi) * eps,
                               rtol=1e-13, atol=1e-13)


def test_conversions_round_trip_to_float64_precision():
    x0, eps, x_t = _data()
    abar = _abar()
    v = v_from_eps_x0(eps, x0, abar)
    tight = dict(rtol=0, atol=1e-13)
    torch.testing.assert_close(eps_from_v(x_t, v, abar), eps, **tight)  # ε → v → ε
    torch.testing.assert_close(x0_from_v(x_t, v, abar), x0, **tight)  # x0 → v → x0
    torch.testing.assert_close(x0_from_eps(x_t, eps_from_x0(x_t, x0, abar), abar), x0, **tight)  # x0 → ε → x0
    torch.testing.assert_close(eps_from_x0(x_t, x0_from_eps(x_t, eps, abar), abar), eps, **tight)  # ε → x0 → ε
    torch.testing.assert_close(v_from_eps_x0(eps_from_v(x_t, v, abar), x0_from_v(x_t, v, abar), abar), v, **tight)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_model_prediction_recovers_eps_and_x0_from_each_target(prediction):
    x0, eps, x_t = _data()
    output = prediction_target(prediction, SCHED, x0, eps, T_IDX)
    pred = model_prediction(SCHED, x_t, T_IDX, output, prediction)
    # x̂_0 from ε divides by √ᾱ (0.0064 at the last step): rounding grows by 1/√ᾱ there, still far below 1e-12.
    torch.testing.assert_close(pred.eps, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-12)
    assert pred.log_variance is None


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_float32_outputs_stay_float32(prediction):
    x0, eps, x_t = (a.float() for a in _data())
    output = torch.cat([prediction_target(prediction, SCHED, x0, eps, T_IDX), torch.zeros_like(x0)], dim=1)
    pred = model_prediction(SCHED, x_t, T_IDX, output, prediction, learn_variance=True)
    assert pred.eps.dtype == pred.x0.dtype == pred.log_variance.dtype == torch.float32
    torch.testing.assert_close(pred.x0, x0, rtol=0, atol=2e-3)


def test_learned_variance_interpolates_log_beta_and_log_beta_tilde():
    """eq. 15: v = −1 gives β̃_t (clipped at t = 0), v = 1 gives β_t, v = 0 their geometric mean."""
    x0, eps, x_t = _data()
    log_small = torch.tensor(SCHED.posterior_log_variance_clipped)[T_IDX].reshape(-1, 1, 1, 1)
    log_large = torch.log(torch.tensor(SCHED.betas))[T_IDX].reshape(-1, 1, 1, 1)
    for v, expected in [(-1.0, log_small), (1.0, log_large), (0.0, 0.5 * (log_small + log_large))]:
        output = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        pred = model_prediction(SCHED, x_t, T_IDX, output, "eps", learn_variance=True)
        torch.testing.assert_close(pred.log_variance, expected.expand_as(x0), rtol=1e-14, atol=0)
        torch.testing.assert_close(pred.eps, eps, rtol=0, atol=0)
    assert math.exp(log_small[0]) == pytest.approx(SCHED.posterior_variance[1], rel=1e-12)


def test_variance_values_round_trip():
    log_small = torch.tensor(SCHED.posterior_log_variance_clipped)[T_IDX].reshape(-1, 1, 1, 1)
    log_large = torch.log(torch.tensor(SCHED.betas))[T_IDX].reshape(-1, 1, 1, 1)
    frac = torch.linspace(-0.25, 1.25, 48, dtype=torch.float64).reshape(1, 3, 4, 4)
    log_var = frac * log_large + (1 - frac) * log_small
    v = frac_from_log_variance(SCHED, T_IDX, log_var)
    torch.testing.assert_close(log_variance_from_frac(SCHED, T_IDX, v), log_var, rtol=1e-14, atol=0)
    # log β − log β̃ ≈ 1e-6 late in the schedule: v from a log-variance loses the digits that gap cancels.
    torch.testing.assert_close(v, 2 * frac.expand_as(v) - 1, rtol=0, atol=1e-8)


def test_v_prediction_is_defined_at_zero_terminal_snr():
    """ᾱ_T = 0: x_T is pure noise, so ε = x_T and x_0 = −v, with no division by √ᾱ."""
    sched = rescale_zero_terminal_snr(SCHED)
    t = torch.full((4,), 999)
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(2, 4, 1, 2, 2, generator=g, dtype=torch.float64).unbind(0)
    pred = model_prediction(sched, x_t, t, v, "v")
    assert torch.equal(pred.eps, x_t) and torch.equal(pred.x0, -v)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_eps_model_view_of_another_parameterization_equals_the_eps_oracle(prediction):
    mu, s = 0.2, 0.4
    oracle = GaussianOracle(SCHED, mu, s)

    class Net(torch.nn.Module):  # the same optimal denoiser, answering in `prediction` units plus a variance half
        def forward(self, x, t):
            eps = oracle(x, t)
            x0 = x0_from_eps(x, eps, _abar(t))
            return torch.cat([prediction_target(prediction, SCHED, x0, eps, t), torch.zeros_like(x)], dim=1)

    x = torch.randn(7, 1, 3, 3, dtype=torch.float64)
    got = EpsModel(Net(), SCHED, prediction, learn_variance=True)(x, T_IDX)
    torch.testing.assert_close(got, oracle(x, T_IDX), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="original"):
        EpsModel(Net(), SCHED.respace(np.arange(0, 1000, 10)), prediction)


def test_bad_inputs_fail_loudly():
    x0, eps, x_t = _data()
    with pytest.raises(ValueError, match="prediction type"):
        model_prediction(SCHED, x_t, T_IDX, eps, "score")
    with pytest.raises(AssertionError, match="even channel count"):
        model_prediction(SCHED, x_t, T_IDX, eps, "eps", learn_variance=True)
    with pytest.raises(AssertionError, match="2C channels"):
        model_prediction(SCHED, x_t, T_IDX, torch.cat([eps, eps], 1)[:, :4], "eps", learn_variance=True)
    with pytest.raises(AssertionError, match="does not match"):
        model_prediction(SCHED, x_t, T_IDX, torch.cat([eps, eps], 1), "eps")
