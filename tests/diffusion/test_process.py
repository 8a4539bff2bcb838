import torch

from diffusion.process import predict_eps, predict_x0, q_posterior, q_sample
from diffusion.schedule import NoiseSchedule


def test_q_sample_has_the_closed_form_moments():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    n, x0 = 200_000, 0.7
    for i in [0, 250, 999]:
        t = torch.full((n,), i)
        x = q_sample(s, torch.full((n, 1), x0, dtype=torch.float64), t, torch.randn(n, 1, generator=g, dtype=torch.float64))
        abar = s.alphas_cumprod[i]
        assert abs(x.mean().item() - abar**0.5 * x0) < 4 * ((1 - abar) / n) ** 0.5 + 1e-9
        assert abs(x.var().item() / (1 - abar) - 1) < 0.02


def test_eps_and_x0_conversions_invert_q_sample():
    s = NoiseSchedule.cosine(50)
    x0, eps = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 5, 10, 20, 40, 49])
    xt = q_sample(s, x0, t, eps)
    torch.testing.assert_close(predict_x0(s, xt, t, eps), x0)
    torch.testing.assert_close(predict_eps(s, xt, t, x0), eps)


def test_q_posterior_shapes_and_point_mass_at_t0():
    s = NoiseSchedule.linear(20)
    x0, xt = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    mean, var, logvar = q_posterior(s, x0, xt, torch.tensor([0, 7]))
    assert mean.shape == x0.shape and var.shape == (2, 1, 1, 1) and logvar.shape == (2, 1, 1, 1)
    torch.testing.assert_close(mean[0], x0[0])
    assert var[0].item() == 0
