"""Class conditioning and classifier-free guidance: the U-Net's label embedding and null class, label dropout,
and `denoise` / `sample` with guidance against closed forms."""

import pytest
import torch
from torch import nn

from diffusion.objectives import drop_labels
from diffusion.packaged import DiffusionModel
from diffusion.samplers import SAMPLERS, sample
from diffusion.samplers.guidance import denoise
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet, UNetConfig

K = 10


def conditional_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.preset("tiny", num_classes=K))
    for param in unet.parameters():  # zero-initialised layers (ResBlock outputs, conv_out) hide the labels at init
        if param.ndim > 1 and not param.any():
            nn.init.normal_(param, std=0.1)
    return unet.eval()


class ClassConstants(nn.Module):
    """ε(x, t, y) = c_y (c_K for the null class), counting calls and rows: guidance then has the closed form
    c_K + s (c_y − c_K)."""

    num_classes = K

    def __init__(self):
        super().__init__()
        self.c = torch.linspace(-1.0, 1.0, K + 1, dtype=torch.float64)
        self.calls: list[int] = []

    def forward(self, x, t, y=None):
        self.calls.append(x.shape[0])
        y = torch.full((x.shape[0],), K) if y is None else y
        return self.c[y].reshape(-1, 1, 1, 1).expand_as(x).to(x.dtype)


def test_null_class_is_unconditional_and_labels_change_the_output():
    unet = conditional_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        null = unet(x, t, torch.full((4,), K))
        assert torch.equal(unet(x, t), null)  # y = None is the null class
        for label in (0, 7):
            assert (unet(x, t, torch.full((4,), label)) - null).abs().max() > 1e-3
        mixed = unet(x, t, torch.tensor([0, 7, K, 3]))
        assert torch.allclose(mixed[2], null[2], atol=1e-6)


def test_bad_labels_are_rejected_by_name():
    unet, x, t = conditional_unet(), torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"in \[0, 9\]"):
        unet(x, t, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match=r"int64 \[2\]"):
        unet(x, t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(UNetConfig.preset("tiny"))(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig.preset("tiny", num_classes=0)


def test_label_dropout_rate_is_measured_at_its_probability():
    y = torch.randint(0, K, (200_000,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    dropped = drop_labels(y, K, 0.1)
    rate = (dropped == K).double().mean().item()
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / y.numel()) ** 0.5, rate
    kept = dropped != K
    assert torch.equal(dropped[kept], y[kept])
    assert torch.equal(drop_labels(y, K, 0.0), y)


def test_guidance_has_the_diffusers_closed_form_in_one_forward_pass():
    model = ClassConstants()
    x, t = torch.zeros(4, 1, 2, 2, dtype=torch.float64), torch.full((4,), 5)
    y, scale = torch.tensor([2, 5, 9, 0]), torch.tensor([1.0, 3.0, 0.0, 7.5], dtype=torch.float64)
    out = denoise(model, x, t, y, scale)
    c = model.c
    expected = c[K] + scale * (c[y] - c[K])
    assert torch.allclose(out.eps[:, 0, 0, 0], expected, atol=1e-12)
    assert out.eps[0, 0, 0, 0] == c[2]  # s = 1: the conditional prediction itself
    assert model.calls == [4 + 3]  # one call: every image, plus a null-class copy of the 3 guided ones
    model.calls.clear()
    denoise(model, x, t, y, 1.0)
    assert model.calls == [4]


def test_scale_one_is_plain_conditional_sampling_exactly():
    unet = conditional_unet()
    model = DiffusionModel(unet, "linear", 1000, class_names=[str(k) for k in range(K)])
    y = torch.tensor([1, 4, 4, 9])

    class Plain(nn.Module):  # a label-free ε-model that closes over y
        def forward(self, x, t):
            return unet(x, t, y)

    for name in ("ddpm", "ddim", "dpmpp-2m"):
        guided = sample(model, model.schedule(), (4, 1, 8, 8), name, 8, torch.Generator().manual_seed(3), y=y,
                        guidance_scale=1.0)
        plain = sample(Plain(), model.schedule(), (4, 1, 8, 8), name, 8, torch.Generator().manual_seed(3))
        assert torch.equal(guided, plain), name


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_guides_a_conditional_model(name):
    model = DiffusionModel(conditional_unet(), "linear", 1000)
    shape, y = (2, 1, 8, 8), torch.tensor([3, 3])
    runs = [sample(model, model.schedule(), shape, name, 6, torch.Generator().manual_seed(0), y=y, guidance_scale=s)
            for s in (1.0, 4.0)]
    assert all(torch.isfinite(r).all() for r in runs)
    assert (runs[0] - runs[1]).abs().max() > 1e-4  # guidance changes the samples


def test_conditioning_an_unconditional_model_is_an_error():
    sched = NoiseSchedule.linear(50)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50)
    with pytest.raises(ValueError, match="guidance_scale 3.0 needs a class-conditional model"):
        sample(model, sched, (1, 1, 8, 8), "ddim", 5, guidance_scale=3.0)
    with pytest.raises(ValueError, match="class labels given"):
        sample(model, sched, (1, 1, 8, 8), "ddim", 5, y=torch.tensor([1]))
    with pytest.raises(ValueError, match="class names"):
        DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50, class_names=["a", "b"])
