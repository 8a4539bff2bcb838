"""benchmarks/sampling_quality.py end to end on a tiny model saved in MLflow's format (a real subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[2]


def test_sampling_quality_benchmark_writes_numbers(tmp_path, tmp_path_factory):
    import mlflow.pytorch

    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50)
    model_dir = tmp_path / "model"
    mlflow.pytorch.save_model(model, model_dir, serialization_format="pickle", pip_requirements=["torch"])
    out_json = tmp_path / "numbers.json"
    cmd = [sys.executable, "-m", "benchmarks.sampling_quality", "--model-uri", str(model_dir), "--quick",
           "--samplers", "ddpm-10", "ddim-5", "--num-samples", "40", "--bpd-batch-size", "4",
           "--cache-dir", str(tmp_path_factory.getbasetemp() / "featnet"), "--output-dir", str(tmp_path / "out"),
           "--json", str(out_json)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| DDIM (η = 0) |" in done.stdout and "ddim-5 samples/s vs ddpm-10" in done.stdout
    numbers = json.loads(out_json.read_text())
    assert [row["sampler"] for row in numbers["table"]] == ["ddpm-10", "ddim-5"]
    assert numbers["config"]["bpd_batches"] == 1 and numbers["metrics"]["test_bpd_num_images"] == 4
    assert numbers["ratios"][0]["ratio"] > 1.0  # 5 DDIM steps outrun 10 DDPM steps
    assert all(Path(p).is_file() for p in numbers["artifacts"])


def test_sampling_quality_rejects_a_bad_sampler_string(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.sampling_quality", "--model-uri", str(tmp_path), "--samplers", "ddim50"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "sampler 'ddim50' is not of the form" in done.stderr
