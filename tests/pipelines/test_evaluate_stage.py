"""The evaluate stage end to end on a tiny model, plus its pieces: sampler strings, config, grids, bits/dim plumbing."""

import csv
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from diffusion.losses import LN2, nll_bpd
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig
from pipelines.evaluate.bpd import evaluate_bpd
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.grid import save_grid
from pipelines.evaluate.sampling import SamplerRun, generate_samples, parse_sampler
from pipelines.evaluate.stage import run_evaluate


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pipelines/conftest.py


def tiny_model(seed: int = 0, num_timesteps: int = 1000) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", num_timesteps)


@pytest.fixture(scope="module")
def trained_model(digits):
    """A tiny model (T = 250) after 200 Adam steps of L_simple on the 8×8 digits: blurry digits, far from noise."""
    from diffusion.losses import l_simple

    model = tiny_model(num_timesteps=250)
    sched = model.schedule()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    train_x = digits[0]
    for _ in range(200):
        batch = train_x[torch.randint(0, train_x.shape[0], (32,), generator=generator)]
        loss = l_simple(model, sched, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("text, kind, steps", [("ddpm-1000", "ddpm", 1000), ("ddim-10", "ddim", 10),
                                               ("ddpm-1", "ddpm", 1), ("ode-heun-18", "ode-heun", 18),
                                               ("dpmpp-2m-10", "dpmpp-2m", 10)])
def test_parse_sampler(text, kind, steps):
    assert parse_sampler(text) == SamplerRun(text, kind, steps)


@pytest.mark.parametrize("text", ["ddim_50", "ddim-0", "ddim-", "plms-10", "DDIM-10", "ddim-10-eta1", " ddim-10",
                                  "ddim-010", "ddim"])
def test_bad_sampler_strings_are_named(text):
    with pytest.raises(ValueError, match=f"sampler {text!r} is not of the form"):
        parse_sampler(text)


def test_generate_samples_is_seeded_and_timed():
    model = tiny_model(num_timesteps=100)
    a = generate_samples(model, parse_sampler("ddim-4"), 5, batch_size=2, seed=7)
    b = generate_samples(model, parse_sampler("ddim-4"), 5, batch_size=2, seed=7)
    c = generate_samples(model, parse_sampler("ddim-4"), 5, batch_size=2, seed=8)
    calls = []
    d = generate_samples(model, parse_sampler("ddpm-6"), 5, batch_size=2, seed=7, progress=calls.append)
    assert a.images.shape == (5, 1, 8, 8) and torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, d.images) and d.images.abs().max() <= 1.0
    assert calls == [1] * (3 * 6)  # one report per model call: 3 batches × 6 steps
    assert a.seconds > 0 and a.samples_per_s == pytest.approx(5 / a.seconds)


def test_config_contract():
    config = EvaluateConfig()
    sizes = (config.bpd_batches, config.bpd_batch_size, config.num_fid_samples, config.sample_batch_size)
    assert sizes == (4, 64, 500, 250)
    assert config.samplers == ["ddpm-1000", "ddim-10", "ddim-20", "ddim-50", "ddim-100"]
    assert (config.fid_feature_net, config.inception_weights, config.seed) == ("digits", None, 0)
    assert (config.guidance_scales, config.guidance_sampler) == ([1.0, 2.0, 3.0, 5.0], "ddim-50")
    assert config.guidance_is_default and not EvaluateConfig(guidance_scales=[1.0, 2.0]).guidance_is_default
    assert not EvaluateConfig(guidance_sampler="ddim-20").guidance_is_default
    with pytest.raises(ValidationError, match="'ddim50' is not of the form"):
        EvaluateConfig(guidance_sampler="ddim50")
    with pytest.raises(ValidationError, match=r"finite and >= 0, got \[-1.0\]"):
        EvaluateConfig(guidance_scales=[1.0, -1.0])
    with pytest.raises(ValidationError, match=r"guidance_scales lists \[2.0\] more than once"):
        EvaluateConfig(guidance_scales=[2, 1, 2.0])
    assert EvaluateConfig(guidance_scales=[]).guidance_scales == []  # turns the sweep off
    with pytest.raises(ValidationError, match="'ddim-fast'"):
        EvaluateConfig(samplers=["ddim-10", "ddim-fast"])
    with pytest.raises(ValidationError, match="more than once"):
        EvaluateConfig(samplers=["ddim-10", "ddim-10"])
    with pytest.raises(ValidationError, match="bpd_batchs"):
        EvaluateConfig(bpd_batchs=2)
    with pytest.raises(ValidationError, match="frozen"):
        config.seed = 1
    assert EvaluateConfig.model_validate(config.model_dump()) == config


def test_save_grid_layout_and_values(tmp_path):
    # Image k is the constant (k / 2 − 1): uint8 round((x + 1) · 127.5) = round(63.75 k).
    images = torch.stack([torch.full((1, 3, 2), k / 2 - 1) for k in range(5)])
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=2, padding=1, scale=2)
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (3 * (6 + 1) + 1, 2 * (4 + 1) + 1)  # 3 rows of 2; each image 6×4 after scale 2
    for k in range(5):
        top, left = 1 + (k // 2) * 7, 1 + (k % 2) * 5
        assert (pixels[top:top + 6, left:left + 4] == round(63.75 * k)).all()
    assert (pixels[0] == 255).all() and (pixels[15:, 6:] == 255).all()  # padding and the empty last cell
    rgb = save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "rgb.png", nrow=8)
    assert Image.open(rgb).mode == "RGB" and Image.open(rgb).size == (2 * 6 + 2, 6 + 2)
    with pytest.raises(ValueError, match="save_grid needs images"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")


def test_bpd_plumbing_matches_nll_bpd_and_closed_form_prior(digits):
    model = tiny_model(num_timesteps=40).eval()
    x0 = digits[2][:6]
    result = evaluate_bpd(model, x0, batch_size=4, seed=3)
    # Batching keeps one generator running across batches: identical to two direct calls sharing it.
    generator = torch.Generator().manual_seed(3)
    direct = [nll_bpd(model, model.schedule(), x0[:4], generator=generator),
              nll_bpd(model, model.schedule(), x0[4:], generator=generator)]
    np.testing.assert_allclose(result.total, torch.cat([d["total_bpd"] for d in direct]).numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.total, result.prior + result.vb + result.decoder, rtol=1e-12)
    np.testing.assert_allclose(result.vb_per_t.sum(), (result.vb + result.decoder).mean(), rtol=1e-9)
    # L_T = KL(N(√ᾱ_T x0, 1 − ᾱ_T) ‖ N(0, 1)) averaged over dimensions, in bits.
    abar = model.schedule().alphas_cumprod[-1]
    x = x0.double().numpy().reshape(6, -1)
    kl = 0.5 * (-math.log(1 - abar) + (1 - abar) + abar * x**2 - 1)
    # L_T ≈ 2e-6 bits is a float32 difference of O(1) terms: compare to float32 resolution.
    np.testing.assert_allclose(result.prior, kl.mean(axis=1) / LN2, rtol=0, atol=1e-7)
    assert result.metrics()["test_bpd_num_images"] == 6


def test_run_evaluate_end_to_end(digits, trained_model, tmp_path, tmp_path_factory):
    train_x, train_y, test_x, _ = digits
    config = EvaluateConfig(bpd_batches=2, bpd_batch_size=8, samplers=["ddpm-25", "ddim-5", "ddim-20"],
                            num_fid_samples=96, sample_batch_size=64, seed=1,
                            feature_cache_dir=str(tmp_path_factory.getbasetemp() / "featnet"))
    result = run_evaluate(config, trained_model, test_x, train_x, train_y, tmp_path / "eval", progress=False)
    m = result.metrics
    assert m["test_bpd_num_images"] == 16
    # Sample counts beside every FID/KID: 96 samples per sampler, the 359 test images, 96 of the 431 hold-out images.
    assert (m["fid_num_samples"], m["fid_num_test_images"], m["fid_num_heldout_images"]) == (96, 359, 96)
    assert all((row["num_samples"], row["num_ref_images"]) == (96, 359) for row in result.table)
    assert m["test_bpd"] == pytest.approx(m["test_prior_bpd"] + m["test_vb_bpd"] + m["test_decoder_bpd"], rel=1e-9)
    assert 0 < m["test_prior_bpd"] < 1e-3 < m["test_decoder_bpd"] < m["test_bpd"] < 16
    assert m["fid_net_val_accuracy"] > 0.93
    names = {p.name for p in result.artifacts}
    assert names == {"bpd_per_t.csv", "bpd_per_t.png", "sampler_table.csv", "sampler_table.md", "fid_vs_model_calls.png",
                     "samples_ddpm-25.png", "samples_ddim-5.png", "samples_ddim-20.png"}
    for path in result.artifacts:
        assert path.parent == tmp_path / "eval" and path.stat().st_size > 0
    with open(tmp_path / "eval" / "bpd_per_t.csv") as f:
        assert len(list(csv.DictReader(f))) == trained_model.num_timesteps
    assert [row["sampler"] for row in result.table] == config.samplers
    for row in result.table:
        assert row["fid"] == m[f"fid_{row['sampler']}"] and row["samples_per_s"] == m[f"samples_per_s_{row['sampler']}"]
        assert row["samples_per_s"] == pytest.approx(96 / row["seconds"])
    # A model after 200 steps is far from real data but much closer than noise; real-vs-real is closest.
    small = config.model_copy(update={"samplers": ["ddim-20"], "bpd_batches": 1, "bpd_batch_size": 2})
    untrained = run_evaluate(small, tiny_model(seed=5, num_timesteps=250), test_x, train_x, train_y,
                             tmp_path / "untrained", progress=False)
    assert m["fid_heldout_vs_test"] < m["fid_ddim-20"] < 0.5 * untrained.metrics["fid_ddim-20"]
    assert abs(m["kid_heldout_vs_test"]) < m["kid_ddim-20"] < untrained.metrics["kid_ddim-20"]  # KID orders alike
    # Real vs real: KID within ~3 standard errors of 0; the samples' KID many standard errors above it.
    assert abs(m["kid_heldout_vs_test"]) < 3 * m["kid_heldout_vs_test_stderr"]
    assert m["kid_ddim-20"] > 5 * m["kid_ddim-20_stderr"] > 0
    assert all(row["kid"] == m[f"kid_{row['sampler']}"] and row["kid_stderr"] == m[f"kid_{row['sampler']}_stderr"]
               for row in result.table)
    assert not any(name.startswith(("fid_guided", "class_accuracy")) for name in m)  # unconditional: no sweep
    assert m["test_bpd"] < untrained.metrics["test_bpd"]
    table_md = (tmp_path / "eval" / "sampler_table.md").read_text()
    assert "| sampler | NFE = 5 | NFE = 20 | NFE = 25 |" in table_md  # Table 1 shape: model calls across
    assert f"| DDIM (η = 0) | {m['fid_ddim-5']:.2f} | {m['fid_ddim-20']:.2f} | — |" in table_md
    assert f"| DDPM (σ² = β̃) | — | — | {m['fid_ddpm-25']:.2f} |" in table_md
    assert f"| DDIM (η = 0) | {1e3 * m['kid_ddim-5']:.2f} | {1e3 * m['kid_ddim-20']:.2f} | — |" in table_md
    assert "### FID ↓ (digits features, 96 samples per sampler against 359 test images)" in table_md
    assert (f"Floor: 96 real images the feature net never saw against the test images, same features: "
            f"FID {m['fid_heldout_vs_test']:.2f}") in table_md


def test_run_evaluate_fails_fast_naming_the_problem(digits, tmp_path):
    train_x, train_y, test_x, _ = digits
    model = tiny_model(num_timesteps=50)
    config = EvaluateConfig(samplers=["ddim-10", "ddpm-100"], feature_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'ddpm-100' asks for 100 steps but the model has only 50"):
        run_evaluate(config, model, test_x, train_x, train_y, tmp_path, progress=False)
    ok = EvaluateConfig(samplers=["ddim-10"], feature_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"test_images must be \[N >= 2, 1, 8, 8\]"):
        run_evaluate(ok, model, test_x[:, :, :4], train_x, train_y, tmp_path, progress=False)
    with pytest.raises(ValueError, match="train_images must lie in"):
        run_evaluate(ok, model, test_x, train_x * 2, train_y, tmp_path, progress=False)
    with pytest.raises(ValueError, match="train_labels must be int64"):
        run_evaluate(ok, model, test_x, train_x, train_y.int(), tmp_path, progress=False)
    # Guidance settings an unconditional model cannot honour fail before any work; the defaults and [] skip the sweep.
    for guidance in ({"guidance_scales": [1.0, 4.0]}, {"guidance_sampler": "ddim-20"}):
        with pytest.raises(ValueError, match="unconditional .*guidance_scales: \\[\\]"):
            run_evaluate(ok.model_copy(update=guidance), model, test_x, train_x, train_y, tmp_path, progress=False)
    missing = EvaluateConfig(samplers=["ddim-10"], fid_feature_net="inception",
                             inception_weights=str(tmp_path / "x.pth"))
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        run_evaluate(missing, model, test_x, train_x, train_y, tmp_path, progress=False)
    assert not list(tmp_path.glob("*.png"))


def test_stage_imports_neither_ray_nor_mlflow():
    code = ("import sys, pipelines.evaluate.stage; "
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
