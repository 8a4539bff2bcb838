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
