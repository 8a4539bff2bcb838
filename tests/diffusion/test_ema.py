import pytest
import torch

from diffusion.ema import EMA, decay_for_half_life


def test_ema_closed_form_for_a_constant_target():
    """a_n = p + d^n (a_0 − p) when the model stays at p and decay is fixed."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    a0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(7):
        ema.update(model)
    for avg, start, p in zip(ema.averaged.parameters(), a0, model.parameters()):
        torch.testing.assert_close(avg, p + 0.9**7 * (start - p))


def test_warmup_decay_schedule():
    ema = EMA(torch.nn.Linear(1, 1), decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 10**7
    assert ema.current_decay() == 0.9999


def test_state_dict_round_trip():
    model = torch.nn.Linear(4, 4)
    ema = EMA(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
    other = EMA(torch.nn.Linear(4, 4), decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert (other.decay, other.warmup, other.num_updates) == (0.99, True, 3)
    torch.testing.assert_close(other.averaged.weight, ema.averaged.weight)


def test_half_life():
    d = decay_for_half_life(100)
    assert d**100 == pytest.approx(0.5)
    with pytest.raises(ValueError):
        decay_for_half_life(0)
