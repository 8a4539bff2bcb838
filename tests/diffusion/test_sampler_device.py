"""Every sampler's model calls checked for what a GPU would punish, on the CPU: run on the meta device (a tensor made
on the wrong device or a host sync raises there, and the result stays on the model's device), no float64 op on a
batch, contiguous attention inputs, and the model call compiled with fullgraph=True equal to the eager one."""

import pytest
import torch

from diffusion.packaged import DiffusionModel
from diffusion.sampler_specs import SAMPLER_NAMES
from diffusion.samplers import sample
from diffusion.samplers.guidance import denoise
from diffusion.unet import UNet, UNetConfig
from tests.diffusion.audit import attention_strides, float64_on_batch

SHAPE = (2, 1, 8, 8)


def model(prediction="v", learn_variance=True, num_classes=4, device="cpu") -> DiffusionModel:
    torch.manual_seed(0)
    unet = UNet(UNetConfig.preset("tiny", learn_variance=learn_variance, num_classes=num_classes))
    return DiffusionModel(unet, "linear", 40, prediction=prediction).to(device).eval()


def run(sampler: str, m: DiffusionModel, device: str) -> torch.Tensor:
    y = torch.tensor([1, 3], device=device)
    return sample(m, m.schedule(), SHAPE, sampler, steps=3, y=y, guidance_scale=torch.tensor([1.0, 2.5]))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs_on_the_models_device_without_a_host_sync(sampler):
    out = run(sampler, model(device="meta"), "meta")
    assert out.device.type == "meta" and out.shape == SHAPE


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_no_sampler_runs_float64_on_a_batch(sampler):
    with float64_on_batch(SHAPE[0]) as audit:
        run(sampler, model(), "cpu")
    assert audit.found == []


def test_attention_gets_contiguous_inputs():
    with attention_strides() as audit:
        run("ddim", model(), "cpu")
    assert audit.found and all(all(flags) for _, flags in audit.found), audit.found


@pytest.mark.parametrize("prediction,learn_variance,num_classes",
                         [("eps", False, None), ("v", True, 4), ("x0", False, 4), ("eps", True, None)])
def test_the_compiled_model_call_has_no_graph_break_and_equals_eager(prediction, learn_variance, num_classes):
    m = model(prediction, learn_variance, num_classes)
    compiled = torch.compile(m.denoise, fullgraph=True, backend="aot_eager")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([39, 7])
    y = None if num_classes is None else torch.tensor([0, 4])
    with torch.no_grad():
        parts = lambda out: (out.eps, out.x0, out.var_values)  # noqa: E731
        for got, want in zip(parts(compiled(x, t, y)), parts(m.denoise(x, t, y))):
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        guided = denoise(m, x, t, y, [1.0, 3.0]) if num_classes else None
    assert guided is None or guided.eps.shape == x.shape
