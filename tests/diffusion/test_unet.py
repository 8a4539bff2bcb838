import pickle

import pytest
import torch

from diffusion.unet import UNet, UNetConfig, count_parameters


def test_default_config_is_the_papers_cifar10_model():
    model = UNet(UNetConfig())
    assert count_parameters(model) == pytest.approx(35.7e6, rel=0.01)
    x = torch.randn(2, 3, 32, 32)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_presets_keep_image_shape(preset):
    cfg = UNetConfig.preset(preset)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    assert UNet(cfg)(x, torch.tensor([0, 5, 999])).shape == x.shape


def test_gradient_reaches_every_parameter_after_one_step():
    """Residual branches and the output start at zero (DDPM's init_scale=0): gradient reaches the inner layers as
    the zero layers move, one layer of zeros per step."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, target = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randn(4, 1, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        (model(x, t) - target).pow(2).mean().backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_output_depends_on_timestep():
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny")).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_config_round_trips_and_rejects_bad_values():
    cfg = UNetConfig.preset("small", dropout=0.0)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({**cfg.to_dict(), "chanels": 3})
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(ch=20)
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(image_size=30)


def test_learn_variance_doubles_the_output_channels():
    cfg = UNetConfig.preset("tiny", learn_variance=True)
    assert cfg.output_channels == 2 and UNetConfig.preset("tiny", out_channels=3, learn_variance=True).output_channels == 6
    x = torch.randn(2, 1, 8, 8)
    assert UNet(cfg)(x, torch.tensor([0, 999])).shape == (2, 2, 8, 8)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_configs_and_state_dicts_without_learn_variance_load_and_give_identical_outputs():
    """A checkpoint from before the field: its config dict lacks the key, and a pickled config lacks the attribute."""
    torch.manual_seed(0)
    cfg = UNetConfig.preset("tiny")
    model = UNet(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    old_dict = {k: v for k, v in cfg.to_dict().items() if k != "learn_variance"}
    loaded = UNet(UNetConfig.from_dict(old_dict)).eval()
    loaded.load_state_dict(model.state_dict())  # strict: same names and shapes
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999])
    assert torch.equal(loaded(x, t), model(x, t))

    old_pickle = UNetConfig.preset("tiny")
    object.__delattr__(old_pickle, "learn_variance")  # as unpickled from before the field existed
    restored = pickle.loads(pickle.dumps(old_pickle))
    assert restored.learn_variance is False and restored.output_channels == 1
    assert UNetConfig.from_dict(restored.to_dict()) == cfg
