"""benchmarks/variance_headroom.py: the closed-form optimal variances, and the rows' order on a real (tiny) model."""

import json
import math

import pytest
import torch

from benchmarks.variance_headroom import ROWS, best_kl_log_variances, main, summary, variance_headroom
from diffusion.losses import LN2, nll_bpd, normal_kl
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig


def test_per_pixel_optimum_is_the_closed_form_and_a_shared_sigma_beats_every_other_shared_sigma():
    torch.manual_seed(0)
    true_mean, mean = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3) * 0.1
    true_logvar = torch.full((4, 1, 1, 1), math.log(0.02))
    lo, hi = true_logvar, true_logvar + math.log(2.0)
    levels = torch.zeros_like(mean, dtype=torch.long)
    best = best_kl_log_variances(true_mean, true_logvar, mean, lo, hi, levels)
    e2 = (true_mean - mean) ** 2
    kl = normal_kl(true_mean, true_logvar, mean, best["best per pixel (free)"])
    torch.testing.assert_close(kl, 0.5 * torch.log1p(e2 / 0.02))  # min over σ² of KL(N(μ̃, β̃) ‖ N(μ, σ²))

    def mean_kl(logvar):
        return float(normal_kl(true_mean, true_logvar, mean, logvar).mean())

    scan = [mean_kl(torch.full_like(mean, v)) for v in torch.linspace(-8.0, 2.0, 2001).tolist()]
    assert mean_kl(best["best per t (free)"]) <= min(scan) + 1e-9
    assert mean_kl(best["best per t (free)"]) == pytest.approx(min(scan), abs=1e-5)
    # every pixel's error is far above β̃, so inside [β̃, 2β̃] the best shared σ² is the interval's top
    torch.testing.assert_close(best["best per t (eq. 15)"], hi.expand_as(mean))
    # one level for every pixel: the per-level optimum is the per-t one
    torch.testing.assert_close(best["best per level (free)"], best["best per t (free)"])


def test_rows_order_and_the_model_row_is_the_evaluate_stage_bound(tmp_path):
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny", learn_variance=True)), "linear", 40).eval()
    x0 = (torch.rand(12, 1, 8, 8) * 16).round() / 8 - 1  # 17 grey levels, like the digits
    terms = variance_headroom(model, x0, seed=3)
    rows = {row["variance"]: row["total_bpd"] for row in summary(terms)}
    assert list(rows) == list(ROWS)
    bound = nll_bpd(model.unet, model.schedule(), x0, generator=torch.Generator().manual_seed(3), learn_variance=True)
    assert rows["model"] == pytest.approx(float(bound["total_bpd"].mean()), rel=1e-5)
    for scope in ("eq. 15", "free"):
        chain = [rows[f"best per {name} ({scope})"] for name in ("t", "level", "pixel")]
        assert chain[0] >= chain[1] >= chain[2] > 0
    assert rows["fixed β̃"] >= rows["best per t (eq. 15)"] - 1e-9  # β̃ is inside eq. 15's interval
    for name in ("t", "level", "pixel"):
        assert rows[f"best per {name} (free)"] <= rows[f"best per {name} (eq. 15)"] + 1e-9
    assert rows["best per pixel (free)"] < rows["model"]

    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "headroom.json"
    main(["--model-uri", str(tmp_path / "model"), "--num-images", "6", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["num_images"] == 6 and [r["variance"] for r in written["rows"]] == list(ROWS)
    assert "seeded 80/20 split" in written["test_data"]  # a model no pipeline trained: the embedded digits
