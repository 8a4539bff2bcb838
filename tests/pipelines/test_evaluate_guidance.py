"""The evaluate stage on a class-conditional model: balanced, seeded labels; classifier-free guidance through
generate_samples (s = 0 is the unconditional branch exactly); the class accuracy and its per-class table; the
guidance sweep end to end on a tiny model trained with label dropout (guidance must raise the class accuracy); and
labels or settings that cannot be honoured rejected with a message."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.packaged import DiffusionModel
from diffusion.process import q_sample
from diffusion.unet import UNet, UNetConfig
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.guidance import class_accuracy, scale_tag
from pipelines.evaluate.sampling import balanced_labels, generate_samples, parse_sampler
from pipelines.evaluate.stage import run_evaluate

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pipelines/conftest.py


def conditional_model(seed: int = 0, num_timesteps: int = 250) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(UNet(UNetConfig.preset("tiny", num_classes=10)), "linear", num_timesteps, class_names=NAMES)


@pytest.fixture(scope="module")
def trained_conditional(digits):
    """A tiny conditional model (T = 250) after 200 Adam steps of L_simple with labels dropped to the null class 20%
    of the time (classifier-free guidance training)."""
    model = conditional_model()
    sched = model.schedule()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = digits[0], digits[1]
    for _ in range(200):
        idx = torch.randint(0, train_x.shape[0], (32,), generator=generator)
        x0, y = train_x[idx], train_y[idx].clone()
        y[torch.rand(32, generator=generator) < 0.2] = 10  # the null class
        t = torch.randint(0, sched.num_timesteps, (32,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = F.mse_loss(model(q_sample(sched, x0, t, noise), t, y), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_balanced_labels_and_scale_tags():
    labels = balanced_labels(23, 10)
    assert labels.dtype == torch.int64 and labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.bincount(labels, minlength=10).tolist() == [3, 3, 3] + [2] * 7
    assert torch.bincount(balanced_labels(500, 10)).tolist() == [50] * 10
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        balanced_labels(5, 0)
    assert [scale_tag(s) for s in (1.0, 2.0, 2.5, 0.0, 7.25)] == ["s1", "s2", "s2.5", "s0", "s7.25"]


def test_class_accuracy_counts_hits_per_class():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    predicted = torch.tensor([0, 1, 0, 0, 2, 2, 1, 1])
    overall, per_class = class_accuracy(predicted, labels, 4)
    assert overall == 5 / 8
    assert per_class[:3] == [2 / 3, 2 / 3, 1 / 2] and np.isnan(per_class[3])  # class 3 has no samples
    with pytest.raises(ValueError, match="equal"):
        class_accuracy(predicted[:3], labels, 4)


def test_guided_generation_is_seeded_and_s0_is_the_unconditional_branch(trained_conditional):
    model = trained_conditional  # an untrained U-Net's zero output layer would ignore the labels
    spec, labels = parse_sampler("ddim-4"), balanced_labels(6, 10)
    unconditional = generate_samples(model, spec, 6, batch_size=4, seed=3)
    s0 = generate_samples(model, spec, 6, batch_size=4, seed=3, labels=labels, guidance_scale=0.0)
    s1 = generate_samples(model, spec, 6, batch_size=4, seed=3, labels=labels, guidance_scale=1.0)
    s3 = generate_samples(model, spec, 6, batch_size=4, seed=3, labels=labels, guidance_scale=3.0)
    again = generate_samples(model, spec, 6, batch_size=4, seed=3, labels=labels, guidance_scale=3.0)
    # ε̂ = ε_∅ + 0 · (ε_y − ε_∅) = ε_∅: the same x_T gives the unconditional samples (up to batched-float noise).
    torch.testing.assert_close(s0.images, unconditional.images, rtol=0, atol=1e-4)
    assert torch.equal(s3.images, again.images)
    assert not torch.allclose(s1.images, unconditional.images, atol=1e-3)
    assert not torch.allclose(s3.images, s1.images, atol=1e-3)
    with pytest.raises(ValueError, match=r"labels must be int64 \[6\]"):
        generate_samples(model, spec, 6, batch_size=4, seed=3, labels=labels.int())
    with pytest.raises(ValueError, match=r"labels must be int64 \[6\]"):
        generate_samples(model, spec, 6, batch_size=4, seed=3, labels=labels[:5])
    with pytest.raises(ValueError, match="class labels must lie in"):  # the model rejects labels past the null class
        generate_samples(model, spec, 6, batch_size=4, seed=3, labels=torch.full((6,), 11))
    unconditional_model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 250)
    with pytest.raises(ValueError, match="model is unconditional"):
        generate_samples(unconditional_model, spec, 6, batch_size=4, seed=3, labels=labels)


def test_guidance_sweep_end_to_end(digits, trained_conditional, tmp_path, tmp_path_factory):
    train_x, train_y, test_x, _ = digits
    config = EvaluateConfig(bpd_batches=1, bpd_batch_size=4, samplers=["ddim-10"], num_fid_samples=100,
                            sample_batch_size=100, guidance_scales=[0.0, 1.0, 3.0], guidance_sampler="ddim-10",
                            feature_cache_dir=str(tmp_path_factory.getbasetemp() / "featnet"))
    result = run_evaluate(config, trained_conditional, test_x, train_x, train_y, tmp_path / "eval", progress=False)
    m = result.metrics
    # Guidance buys class accuracy: chance (10%) at s = 0 (the unconditional branch), clearly better at s = 1,
    # nearly the classifier's own at s = 3.
    assert m["class_accuracy_s0"] < 0.3 < m["class_accuracy_s1"] < m["class_accuracy_s3"]
    assert m["class_accuracy_s3"] > 0.75 and m["classifier_val_accuracy"] > 0.93
    assert (m["class_accuracy_best"], m["guidance_scale_best"]) == (m["class_accuracy_s3"], 3.0)
    # s = 0 samples the null class from the same x_T as the unconditional ddim-10 row: the same FID.
    assert m["fid_guided_s0"] == pytest.approx(m["fid_ddim-10"], rel=1e-3)
    assert [row["guidance_scale"] for row in result.guidance] == [0.0, 1.0, 3.0]
    for row in result.guidance:
        tag = scale_tag(row["guidance_scale"])
        assert (row["fid"], row["kid"], row["kid_stderr"]) == (m[f"fid_guided_{tag}"], m[f"kid_guided_{tag}"],
                                                               m[f"kid_guided_{tag}_stderr"])
        assert (row["num_samples"], row["num_ref_images"], row["sampler"]) == (100, test_x.shape[0], "ddim-10")
        # 10 samples per class: the overall accuracy is the mean of the per-class ones.
        assert row["class_accuracy"] == pytest.approx(np.mean(row["per_class_accuracy"]), abs=1e-12)
        assert row["samples_per_s"] == pytest.approx(100 / row["seconds"])
    names = {p.name for p in result.artifacts}
    assert {"guidance_table.csv", "guidance_table.md", "guidance.png", "samples_guided_s0.png", "samples_guided_s1.png",
            "samples_guided_s3.png", "samples_ddim-10.png", "sampler_table.md"} <= names
    with open(tmp_path / "eval" / "guidance_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["class_accuracy"]) for r in rows] == [row["class_accuracy"] for row in result.guidance]
    table_md = (tmp_path / "eval" / "guidance_table.md").read_text()
    assert "(ddim-10, 100 samples per scale, 10 per class; digits features against 359 test images)" in table_md
    row3 = result.guidance[2]
    assert (f"| 3 | {row3['fid']:.2f} | {1e3 * row3['kid']:.2f} ± {1e3 * row3['kid_stderr']:.2f} | "
            f"{100 * row3['class_accuracy']:.1f}% |") in table_md
    assert "| s | " + " | ".join(NAMES) + " |" in table_md
    assert f"floor: real images the feature net never saw: FID {m['fid_heldout_vs_test']:.2f}" in table_md
    assert f"unconditional (null class), ddim-10: FID {m['fid_ddim-10']:.2f}" in table_md
    json.dumps(result.guidance)  # logged to MLflow as guidance_table.json
    # One row per class, GRID_PER_CLASS = 10 samples each, 8×8 images at scale 8 with 2-pixel padding, plus labels.
    grid = Image.open(tmp_path / "eval" / "samples_guided_s3.png")
    assert grid.height == 10 * (64 + 2) + 2 and grid.width > 10 * (64 + 2) + 2


def test_guidance_settings_and_labels_that_cannot_be_honoured(digits, tmp_path):
    train_x, train_y, test_x, _ = digits
    model = conditional_model(num_timesteps=20)
    config = EvaluateConfig(samplers=["ddim-2"], guidance_sampler="ddim-2", feature_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'ddim-50' asks for 50 steps but the model has only 20"):
        run_evaluate(config.model_copy(update={"guidance_sampler": "ddim-50"}), model, test_x, train_x, train_y,
                     tmp_path, progress=False)
    bad = train_y.clone()
    bad[0] = 10  # a label the model's 10 classes do not have
    with pytest.raises(ValueError, match=r"train_labels span \[0, 10\] but the model has 10 classes"):
        run_evaluate(config, model, test_x, train_x, bad, tmp_path, progress=False)
    bad[0] = -1
    with pytest.raises(ValueError, match=r"train_labels span \[-1, 9\]"):
        run_evaluate(config, model, test_x, train_x, bad, tmp_path, progress=False)
    keep = train_y < 9  # the classifier would never learn class 9
    with pytest.raises(ValueError, match=r"train_labels span \[0, 8\] but the model has 10 classes"):
        run_evaluate(config, model, test_x, train_x[keep], train_y[keep], tmp_path, progress=False)
    assert not list(tmp_path.glob("*.png"))
