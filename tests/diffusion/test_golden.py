"""Fixed-seed outputs of the library, recorded once and compared bit for bit (torch.equal): every sampler's images
for tiny seeded models (unconditional ε, class-conditional with guidance, v-prediction with a learned variance,
zero terminal SNR), DDIM inversion, and the training losses of every objective, prediction and weighting plus the
ELBO. A refactor of diffusion/ must leave all of them identical.

The fixture was written before the core was reorganised:  python -m tests.diffusion.test_golden --write
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion.losses import l_simple, nll_bpd
from diffusion.objectives import training_losses
from diffusion.packaged import DiffusionModel
from diffusion.sampler_specs import SAMPLER_NAMES
from diffusion.samplers import ddim_encode, sample
from diffusion.unet import UNet, UNetConfig

FIXTURE = Path(__file__).parent / "fixtures" / "golden.safetensors"
SHAPE = (3, 1, 8, 8)
T = 50


def tiny_model(seed: int, **options) -> DiffusionModel:
    """A seeded 8×8 one-channel U-Net packaged with a T = 50 linear schedule; `options` go to the package
    (prediction, zero_terminal_snr) or, for learn_variance / num_classes, to the U-Net config."""
    config_keys = {"learn_variance", "num_classes"}
    config = UNetConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.0, norm_groups=8, **{k: v for k, v in options.items() if k in config_keys})
    torch.manual_seed(seed)
    unet = UNet(config)
    with torch.no_grad():  # zero-initialised output layers would make every model the same: perturb them all
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())))
    package = {k: v for k, v in options.items() if k not in config_keys}
    return DiffusionModel(unet, "linear", T, **package).eval()


# (case name, model options, sampler, steps, sample() keyword arguments)
SAMPLE_CASES = [
    *[(f"uncond/{name}", {}, name, 5, {}) for name in SAMPLER_NAMES],
    ("uncond/ddpm-all-steps", {}, "ddpm", None, {}),
    ("uncond/ddpm-large", {}, "ddpm", 6, {"variance": "large", "clip_x0": False}),
    ("uncond/ddim-eta", {}, "ddim", 6, {"eta": 0.7, "spacing": "trailing"}),
    ("uncond/pc-2", {}, "pc", 4, {"corrector_steps": 2, "snr": 0.2}),
    ("uncond/dpmpp-linspace", {}, "dpmpp-2m", 6, {"spacing": "linspace", "clip_x0": False}),
    *[(f"cond/{name}", {"num_classes": 3}, name, 4, {"y": torch.tensor([0, 2, 3]), "guidance_scale": 2.5})
      for name in SAMPLER_NAMES],
    ("cond/ddim-plain", {"num_classes": 3}, "ddim", 4, {"y": torch.tensor([1, 1, 0])}),
    *[(f"v-learned/{name}", {"prediction": "v", "learn_variance": True}, name, 5, {})
      for name in ("ddpm", "ddim", "dpmpp-2m", "ode-heun")],
    ("v-learned/ddpm-all-steps", {"prediction": "v", "learn_variance": True}, "ddpm", None, {}),
    ("v-learned-cond/ddpm", {"prediction": "v", "learn_variance": True, "num_classes": 2}, "ddpm", 5,
     {"y": torch.tensor([0, 1, 2]), "guidance_scale": 3.0}),
    ("x0/ddim", {"prediction": "x0"}, "ddim", 5, {"eta": 0.3}),
    *[(f"zsnr/{name}", {"prediction": "v", "zero_terminal_snr": True}, name, 5, {})
      for name in ("ddpm", "ddim", "dpmpp-2m")],
]

LOSS_CASES = [
    (objective, prediction, learn_variance, weighting)
    for objective in ("l_simple", "l_hybrid", "l_vlb")
    for prediction in ("eps", "v", "x0")
    for learn_variance in {"l_simple": (False,), "l_hybrid": (True,), "l_vlb": (False, True)}[objective]
    for weighting in (("none", "min_snr") if objective != "l_vlb" else ("none",))
]


def sample_case(case) -> torch.Tensor:
    _, options, sampler, steps, kwargs = case
    model = tiny_model(7, **options)
    return sample(model, model.schedule(), SHAPE, sampler=sampler, steps=steps,
                  generator=torch.Generator().manual_seed(11), **kwargs)


def loss_case(case) -> dict[str, torch.Tensor]:
    objective, prediction, learn_variance, weighting = case
    model = tiny_model(5, learn_variance=learn_variance)
    sched = model.schedule()
    g = torch.Generator().manual_seed(13)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    t, noise = torch.randint(0, T, (SHAPE[0],), generator=g), torch.randn(SHAPE, generator=g)
    terms = training_losses(model.unet, sched, x0, t, noise, objective=objective, prediction=prediction,
                            learn_variance=learn_variance, loss_weighting=weighting)
    terms["loss"].mean().backward()
    grads = [p.grad for p in model.unet.parameters() if p.grad is not None]
    grad_sq = torch.stack([g.double().square().sum() for g in grads])  # one value per parameter tensor
    return {**{k: v.detach() for k, v in terms.items()}, "grad_sq": grad_sq, "grad_out": grads[-2].clone()}


def other_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(17)
    x0 = (torch.randint(0, 256, SHAPE, generator=g).float() / 127.5 - 1.0)
    model = tiny_model(3)
    sched = model.schedule()
    out = {"encode/ddim": ddim_encode(model, sched, x0, steps=5)}
    torch.manual_seed(19)
    out["l_simple"] = l_simple(model.unet, sched, x0).detach()
    elbo = nll_bpd(model.unet, sched, x0, generator=torch.Generator().manual_seed(23))
    out.update({f"nll/{k}": v for k, v in elbo.items()})
    learned = tiny_model(4, prediction="v", learn_variance=True)
    out.update({f"nll-learned/{k}": v for k, v in learned.nll_bpd(x0, torch.Generator().manual_seed(29)).items()})
    return out


def compute_all() -> dict[str, torch.Tensor]:
    values = {f"sample/{case[0]}": sample_case(case) for case in SAMPLE_CASES}
    for case in LOSS_CASES:
        values.update({f"loss/{'/'.join(map(str, case))}/{k}": v for k, v in loss_case(case).items()})
    values.update(other_cases())
    return {k: v.contiguous() for k, v in values.items()}


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    assert FIXTURE.exists(), f"{FIXTURE} missing: it is committed, not generated by the test"
    return load_file(str(FIXTURE))


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=[case[0] for case in SAMPLE_CASES])
def test_sampler_images_are_bit_identical(golden, case):
    assert torch.equal(sample_case(case), golden[f"sample/{case[0]}"])


@pytest.mark.parametrize("case", LOSS_CASES, ids=["/".join(map(str, case)) for case in LOSS_CASES])
def test_training_losses_and_gradients_are_bit_identical(golden, case):
    prefix = f"loss/{'/'.join(map(str, case))}/"
    got = loss_case(case)
    assert set(got) == {k[len(prefix):] for k in golden if k.startswith(prefix)}
    assert all(torch.equal(value, golden[prefix + key]) for key, value in got.items())


def test_inversion_and_elbo_are_bit_identical(golden):
    got = other_cases()
    mismatched = [key for key, value in got.items() if not torch.equal(value, golden[key])]
    assert mismatched == []


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FIXTURE.parent.mkdir(exist_ok=True)
    save_file(compute_all(), str(FIXTURE))
    print(f"wrote {FIXTURE}")
