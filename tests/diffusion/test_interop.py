"""diffusers interop with randomly initialised models of the `google/ddpm-cifar10-32` layout (its config verbatim
except narrower widths for test speed: block_out_channels (32, 64, 64, 64) instead of (128, 256, 256, 256); every
layout option — downsample_padding 0, norm_eps 1e-6, freq_shift 1, flip_sin_to_cos false, attention at 16×16, two
layers per block, single-head attention — as in the checkpoint): ε agrees both ways, DDIM from diffusers'
DDIMScheduler on the exported model equals ours from the same noise, the export loads with DDPMPipeline."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import nn

from diffusion.interop import UnsupportedOption, from_diffusers, load_diffusers_dir, save_diffusers_dir, to_diffusers
from diffusion.packaged import DiffusionModel
from diffusion.samplers import sample
from diffusion.unet import UNet, UNetConfig

CIFAR10_32 = dict(  # google/ddpm-cifar10-32's unet/config.json, widths / 4
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
    downsample_padding=0, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, attention_head_dim=None,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, resnet_time_scale_shift="default",
    time_embedding_type="positional")
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 variance_type="fixed_large", clip_sample=True)
T = torch.tensor([0, 10, 500, 999])


@pytest.fixture(scope="module")
def theirs() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**CIFAR10_32).eval()  # diffusers' own random init (no zero-initialised layers)


@pytest.fixture(scope="module")
def ours() -> DiffusionModel:
    torch.manual_seed(1)
    config = UNetConfig(ch=32, ch_mult=(1, 2, 2, 2), dropout=0.0, downsample_padding=0, norm_eps=1e-6)
    model = DiffusionModel(UNet(config), "linear", 1000).eval()
    for param in model.parameters():  # our init zeroes each residual branch's last layer: randomise everything
        nn.init.normal_(param, std=0.03)
    return model


def eps_pair(unet2d: UNet2DModel, model: DiffusionModel) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet2d(x, T).sample, model(x, T)


def test_from_diffusers_gives_the_same_eps(theirs):
    model = from_diffusers(theirs, DDPMScheduler(**SCHEDULER).config)
    assert (model.config.downsample_padding, model.config.norm_eps, model.config.attn_resolutions) == (0, 1e-6, (16,))
    expected, got = eps_pair(theirs, model)
    assert expected.abs().mean() > 0.1  # not a trivially zero network
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_to_diffusers_gives_the_same_eps_and_ddim_samples(ours):
    unet2d, scheduler = to_diffusers(ours)
    expected, got = eps_pair(unet2d, ours)
    assert got.abs().mean() > 0.02  # not a trivially zero network
    assert torch.allclose(expected, got, atol=1e-5, rtol=0)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(10)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x = x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            # ours recomputes ε from the clipped x̂_0 (diffusers' use_clipped_model_output)
            x = ddim.step(unet2d(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        mine = sample(ours, ours.schedule(), x_T.shape, "ddim", 10, x_T=x_T.clone())
    assert x.abs().max() > 0.5
    assert torch.allclose(mine, x, atol=1e-4, rtol=0), (mine - x).abs().max()


def test_export_loads_with_ddpm_pipeline_and_imports_back(ours, tmp_path):
    save_diffusers_dir(ours, tmp_path / "export")
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "export")
    expected, got = eps_pair(pipeline.unet, ours)
    assert torch.allclose(expected, got, atol=1e-5, rtol=0)
    back = load_diffusers_dir(tmp_path / "export")
    assert back.config == ours.config and back.schedule_name == "linear" and back.prediction == "eps"
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("option, value", [("attention_head_dim", 8), ("resnet_time_scale_shift", "scale_shift"),
                                           ("class_embed_type", "timestep"), ("center_input_sample", True)])
def test_options_that_cannot_be_mapped_are_refused_by_name(option, value):
    small = {**CIFAR10_32, "block_out_channels": (32, 32, 32, 32), option: value}
    with pytest.raises(UnsupportedOption, match=f"cannot map {option}="):
        from_diffusers(UNet2DModel(**small), DDPMScheduler(**SCHEDULER).config)
    with pytest.raises(UnsupportedOption, match="cannot map beta_schedule='sigmoid'"):
        from_diffusers(UNet2DModel(**{**CIFAR10_32, "block_out_channels": (32, 32, 32, 32)}),
                       {**SCHEDULER, "beta_schedule": "sigmoid"})
    conditional = DiffusionModel(UNet(UNetConfig.preset("tiny", num_classes=3)), "linear", 50)
    with pytest.raises(UnsupportedOption, match="cannot map num_classes=3"):
        to_diffusers(conditional)
