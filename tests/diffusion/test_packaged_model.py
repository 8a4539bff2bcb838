"""The packaged model and the samplers under the objectives' options: learned variance in DDPM sampling,
v-prediction, zero-terminal-SNR schedules (with the trailing spacing), and the model format (config.json +
model.safetensors): round trip, and bad configs or tampered weights refused with the key or tensor named."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion.packaged import DiffusionModel
from diffusion.samplers import Denoised, ddpm_step, sample
from diffusion.schedule import NoiseSchedule, rescale_zero_terminal_snr
from diffusion.unet import UNet, UNetConfig
from tests.diffusion.oracles import GaussianOracle

MU, S = 0.3, 0.5


class LearnedVarianceOracle(nn.Module):
    """The Gaussian oracle's ε̂ plus a constant variance channel v_Σ (−1 → β̃, +1 → β): [B, 2C, ...]."""

    def __init__(self, sched: NoiseSchedule, value: float):
        super().__init__()
        self.oracle, self.value = GaussianOracle(sched, MU, S), value

    def forward(self, x, t):
        return torch.cat([self.oracle(x, t), torch.full_like(x, self.value)], dim=1)


class VOracle(nn.Module):
    """E[x_0 | x_t] for x_0 ~ N(μ, s²) on any schedule (also at ᾱ = 0, where it is μ) returned as ε̂ and x̂_0, as a
    v-prediction model gives them."""

    num_classes = None

    def __init__(self, sched: NoiseSchedule):
        super().__init__()
        self.abar = torch.tensor(sched.alphas_cumprod)

    def denoise(self, x, t, y=None):
        abar = self.abar[t].reshape(-1, *([1] * (x.ndim - 1)))
        a, b = abar.sqrt(), (1 - abar).sqrt()
        x0 = MU + a * S**2 / (a * a * S**2 + b * b) * (x.double() - a * MU)
        return Denoised(((x.double() - a * x0) / b).to(x.dtype), x0.to(x.dtype))


def test_learned_variance_at_its_ends_is_ddpm_with_the_fixed_variances():
    """v_Σ = −1 gives Σ_θ = β̃_t and +1 gives β_t (eq. 15): DDPM with such a model equals DDPM small / large with
    the same ε̂ and noise. On a respaced walk the ends are the walk's own β̃ and β."""
    sched = NoiseSchedule.linear(1000)
    for value, variance in ((-1.0, "small"), (1.0, "large")):
        for steps in (1000, 25):
            learned = DiffusionModel(UNet(UNetConfig.preset("tiny", learn_variance=True)), "linear", 1000)
            learned.unet = LearnedVarianceOracle(sched, value)  # the packaged reading of a [B, 2C] output
            learned.unet.config = UNetConfig.preset("tiny", learn_variance=True)
            runs = [sample(m, sched, (4000, 1, 1, 1), "ddpm", steps, torch.Generator().manual_seed(0), clip_x0=False,
                           **({} if m is learned else {"variance": variance}))
                    for m in (learned, GaussianOracle(sched, MU, S))]
            assert torch.allclose(runs[0], runs[1], atol=1e-5), (value, steps)


def test_ddpm_step_uses_a_given_log_variance_per_element():
    sched = NoiseSchedule.linear(100)
    x, eps, noise = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    log_var = torch.log(torch.tensor([[1e-4, 2e-4], [3e-4, 4e-4], [5e-4, 6e-4]]))
    mean = ddpm_step(sched, eps, x, 50, None if False else torch.zeros_like(x), clip_x0=False)
    stepped = ddpm_step(sched, eps, x, 50, noise, clip_x0=False, log_variance=log_var)
    assert torch.allclose(stepped, mean + torch.exp(0.5 * log_var) * noise, atol=1e-7)
    assert torch.equal(ddpm_step(sched, eps, x, 0, None, clip_x0=False, log_variance=log_var),
                       ddpm_step(sched, eps, x, 0, None, clip_x0=False))  # no noise at the last step


def exact_final_law(walk: NoiseSchedule, name: str) -> tuple[float, float]:
    """(mean, std) of x_0 from x_T ~ N(0, 1) through `name`'s update with the exact denoiser: every step is affine in
    x (x̂_0 = μ + k (x − a μ), ε̂ = (x − a x̂_0) / b), so the law stays Gaussian and its moments propagate exactly."""
    m, v = 0.0, 1.0
    for i in reversed(range(walk.num_timesteps)):
        abar, abar_prev = float(walk.alphas_cumprod[i]), float(walk.alphas_cumprod_prev[i])
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        k = a * S**2 / (a * a * S**2 + b * b)  # x̂_0 = k x + (μ − k a μ)
        if name == "ddpm":
            c1, c2 = float(walk.posterior_mean_coef1[i]), float(walk.posterior_mean_coef2[i])
            gain, shift, noise_var = c1 * k + c2, c1 * (MU - k * a * MU), float(walk.posterior_variance[i]) * (i > 0)
        else:  # DDIM η = 0: √ᾱ_prev x̂_0 + √(1 − ᾱ_prev) ε̂
            eps_gain, eps_shift = (1 - a * k) / b, -a * (MU - k * a * MU) / b
            gain = math.sqrt(abar_prev) * k + math.sqrt(1 - abar_prev) * eps_gain
            shift = math.sqrt(abar_prev) * (MU - k * a * MU) + math.sqrt(1 - abar_prev) * eps_shift
            noise_var = 0.0
        m, v = gain * m + shift, gain * gain * v + noise_var
    return m, math.sqrt(v)


def test_zero_terminal_snr_sampling_starts_at_pure_noise_and_follows_its_exact_law():
    """ᾱ_{T−1} = 0: ε̂ says nothing there, so the sampler must take the model's x̂_0 (v-prediction). With the exact
    denoiser, DDPM and DDIM from the terminal step end on the Gaussian law their updates give."""
    from diffusion.samplers import respaced

    sched = rescale_zero_terminal_snr(NoiseSchedule.linear(1000))
    assert sched.alphas_cumprod[-1] == 0.0
    model = VOracle(sched)
    for name, steps, spacing in (("ddpm", 1000, "linspace"), ("ddpm", 100, "trailing"), ("ddim", 50, "trailing")):
        x = sample(model, sched, (20000, 1), name, steps, torch.Generator().manual_seed(1), clip_x0=False,
                   spacing=spacing)
        mean, std = exact_final_law(respaced(sched, steps, spacing), name)
        assert torch.isfinite(x).all(), name
        assert abs(x.mean().item() - mean) < 0.015 and abs(x.std().item() - std) < 0.015, (name, x.std(), std)
        assert abs(mean - MU) < 0.01 and abs(std - S) < 0.1  # and that law is close to the data's
    with pytest.raises(ValueError, match="trailing"):
        sample(model, sched, (2, 1), "ddim", 50, spacing="leading")
    from diffusion.samplers import get_sampler

    for name in ("ddim", "dpmpp-2m"):  # their default spacings (leading, logsnr) skip T − 1: trailing instead
        state = get_sampler(name).start(sched, torch.zeros(2, 1), 20)
        assert state.options["spacing"] == "trailing" and state.sched.timesteps[-1] == 999
        assert torch.isfinite(sample(model, sched, (64, 1), name, 20, clip_x0=False)).all()
    with pytest.raises(ValueError, match="cannot start from a zero-terminal-SNR"):
        sample(model, sched, (2, 1), "ode-heun", 10)


def test_v_prediction_model_gives_the_same_eps_and_x0_as_its_eps_twin():
    """A v-network whose output encodes a given ε-network's (ε̂, x̂_0) reads back to the same ε̂ through the package."""
    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, MU, S)

    class AsV(nn.Module):
        config = UNetConfig.preset("tiny")

        def forward(self, x, t):
            abar = torch.tensor(sched.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
            eps = oracle(x, t).double()
            x0 = (x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
            return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).to(x.dtype)

    packaged = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 1000, prediction="v")
    packaged.unet = AsV()
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([0, 10, 300, 700, 999])
    assert torch.allclose(packaged(x, t), oracle(x, t), atol=1e-5)


def random_model(**unet_options) -> DiffusionModel:
    torch.manual_seed(0)
    config = UNetConfig.preset("tiny", **unet_options)
    classes = [f"c{k}" for k in range(config.num_classes)] if config.num_classes else None
    model = DiffusionModel(UNet(config), "cosine", 50, {"training_run_id": "r1", "training_steps": 7}, "v", True,
                           classes).eval()
    for param in model.parameters():
        nn.init.normal_(param, std=0.05)
    return model


def test_save_pretrained_round_trip_samples_identically(tmp_path):
    """config.json + model.safetensors bring back the same network, schedule, parameterization, classes and
    provenance: the same samples bit for bit."""
    model = random_model(num_classes=3, learn_variance=True)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DiffusionModel.from_pretrained(tmp_path / "m")
    assert loaded.describe() == model.describe() and loaded.class_names == ("c0", "c1", "c2")
    y = torch.tensor([0, 2, 3])
    runs = [sample(m, m.schedule(), (3, 1, 8, 8), "ddpm", 10, torch.Generator().manual_seed(4), y=y,
                   guidance_scale=2.0) for m in (model, loaded)]
    assert torch.equal(runs[0], runs[1])
    assert math.isfinite(loaded.nll_bpd(torch.zeros(1, 1, 8, 8))["total_bpd"].item())


def edit_config(directory, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(sneaky=1), r"unknown config keys \['sneaky'\]"),
    (lambda c: c.pop("prediction"), r"missing config keys \['prediction'\]"),
    (lambda c: c["unet"].update(attention_heads=4), r"'unet'.*unknown UNetConfig fields: \['attention_heads'\]"),
    (lambda c: c.update(format_version=99), "version 99"),
    (lambda c: c.update(image_shape=[3, 8, 8]), "image_shape"),
])
def test_a_bad_config_is_an_error_naming_the_key(tmp_path, change, message):
    random_model().save_pretrained(tmp_path)
    edit_config(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        DiffusionModel.from_pretrained(tmp_path)


def test_tampered_weights_are_an_error_naming_the_tensor_or_file(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = torch.zeros(16, 1, 5, 5)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"tensor 'conv_in.weight' is torch.float32 \(16, 1, 5, 5\)"):
        DiffusionModel.from_pretrained(tmp_path)
    del tensors["conv_in.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"missing tensors \['conv_in.weight'\]"):
        DiffusionModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        DiffusionModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DiffusionModel.from_pretrained(tmp_path)
