"""benchmarks/sampling_quality.py end to end on a tiny model saved in MLflow's format (a real subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[2]
# One thread per process: a tiny model gains nothing from more, and loses much when other work shares the cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sampling_quality_benchmark_writes_numbers(tmp_path, tmp_path_factory):
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out_json = tmp_path / "numbers.json"
    cmd = [sys.executable, "-m", "benchmarks.sampling_quality", "--model-uri", str(model_dir), "--quick",
           "--samplers", "ddpm-10", "ddim-5", "--num-samples", "40", "--bpd-batch-size", "4",
           "--cache-dir", str(tmp_path_factory.getbasetemp() / "featnet"), "--output-dir", str(tmp_path / "out"),
           "--json", str(out_json)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| DDIM (η = 0) |" in done.stdout and "ddim-5 samples/s vs ddpm-10" in done.stdout
    numbers = json.loads(out_json.read_text())
    assert [row["sampler"] for row in numbers["table"]] == ["ddpm-10", "ddim-5"]
    assert numbers["config"]["bpd_batches"] == 1 and numbers["metrics"]["test_bpd_num_images"] == 4
    assert numbers["ratios"][0]["ratio"] > 1.0  # 5 DDIM steps outrun 10 DDPM steps
    assert all(Path(p).is_file() for p in numbers["artifacts"])


def test_sampling_quality_rejects_a_bad_sampler_string(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.sampling_quality", "--model-uri", str(tmp_path), "--samplers", "ddim50"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode != 0 and "sampler 'ddim50' is not of the form" in done.stderr


def test_sampling_quality_benchmark_sweeps_guidance_on_a_conditional_model(tmp_path, tmp_path_factory):
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny", num_classes=10)), "linear", 50)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out_json = tmp_path / "numbers.json"
    cmd = [sys.executable, "-m", "benchmarks.sampling_quality", "--model-uri", str(model_dir), "--quick",
           "--samplers", "ddim-2", "--guidance-scales", "1", "2", "--guidance-sampler", "ddim-2", "--num-samples", "20",
           "--bpd-batch-size", "2", "--cache-dir", str(tmp_path_factory.getbasetemp() / "featnet"),
           "--output-dir", str(tmp_path / "out"), "--json", str(out_json)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Classifier-free guidance (ddim-2, 20 samples per scale, 2 per class" in done.stdout
    numbers = json.loads(out_json.read_text())
    assert [row["guidance_scale"] for row in numbers["guidance"]] == [1.0, 2.0]
    assert numbers["config"]["guidance_scales"] == [1.0, 2.0]
    targets = {row["what"]: row for row in numbers["rows"]}
    accuracy = targets["class accuracy at s = " + f"{numbers['metrics']['guidance_scale_best']:g}"
                       + " (best of the sweep) vs classifier on real"]
    assert accuracy["ours"] == 100 * numbers["metrics"]["class_accuracy_best"] and accuracy["target"] == "≥ 90%"
    guided = targets["guided FID at s = 1 (ddim-2) vs unconditional ddim-2"]
    assert (guided["ours"], guided["baseline"]) == (numbers["metrics"]["fid_guided_s1"], numbers["metrics"]["fid_ddim-2"])
    # An untrained model misses the accuracy target, and the run says so.
    assert "targets missed: class accuracy at s =" in done.stdout


def test_sampling_quality_refuses_guidance_flags_on_an_unconditional_model(tmp_path):
    from benchmarks.sampling_quality import main

    model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50)
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit, match="--guidance-scales / --guidance-sampler need a class-conditional model"):
        main(["--model-uri", str(tmp_path / "model"), "--guidance-scales", "2"])


def test_sampling_quality_reads_the_splits_the_model_trained_on(ray_session, tmp_path):
    """Train and test come from the ingest output of the model's own pipeline (found through MLflow), or --splits;
    a model no pipeline trained falls back to a seeded digits split, and says so."""
    import mlflow
    from PIL import Image

    from benchmarks.sampling_quality import load_data, parse_args
    from pipelines.cache import write_record
    from pipelines.ingest.config import IngestConfig
    from pipelines.ingest.reader import load_split_tensor
    from pipelines.ingest.stage import run_ingest
    from pipelines.stage import StageRecord
    from pipelines.storage import Storage

    src = tmp_path / "src"
    for digit in range(2):
        (src / str(digit)).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (8, 8), 10 * i + 120 * digit).save(src / str(digit) / f"{i}.png")
    config = IngestConfig.model_validate({"source": {"kind": "folder", "path": str(src)},
                                          "image": {"size": 8, "channels": 1}, "split": {"val": 0.0, "test": 0.25}})
    stage_dir = tmp_path / "stages" / "ingest-0123"
    splits = run_ingest(config, stage_dir, progress=False).splits
    split_uris = {name: str(path) for name, path in splits.items()}
    write_record(Storage(str(stage_dir)), StageRecord(
        stage="ingest", kind="ingest", key="0123", uri=str(stage_dir), values={"splits": split_uris},
        content_hash="0", run_id=None, seconds=0.0, finished_at="2026-12-03T00:00:00+00:00"))
    # What a pipeline run logs: a parent run with an ingest and a train child; the model names its training run.
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("e")
    parent = client.create_run(experiment).info.run_id
    client.create_run(experiment, tags={"mlflow.parentRunId": parent, "raydiff.kind": "ingest",
                                        "raydiff.output_uri": str(stage_dir)})
    train_run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "raydiff.kind": "train"})
    model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50,
                           metadata={"training_run_id": train_run.info.run_id})

    args = parse_args(["--model-uri", "m", "--tracking-uri", tracking_uri])
    train_x, train_y, test_x, source = load_data(args, 8, model)
    want_train, want_labels = load_split_tensor(splits["train"])
    assert torch.equal(train_x, want_train) and torch.equal(train_y, want_labels)
    assert torch.equal(test_x, load_split_tensor(splits["test"])[0]) and len(test_x) + len(train_x) == 20
    assert source == f"the ingest splits {splits['train']} and {splits['test']}"
    explicit = load_data(parse_args(["--model-uri", "m", "--splits", str(Path(splits["test"]).parent)]), 8)
    assert torch.equal(explicit[2], test_x)

    untracked = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50)
    assert "seeded 80/20 split (seed 0; a model trained on other splits" in load_data(args, 8, untracked)[3]
    with pytest.raises(SystemExit, match="model samples 16×16"):
        load_data(args, 16, model)
    with pytest.raises(SystemExit, match=r"no split directory .*/train or .*/test \(an ingest stage's output"):
        load_data(parse_args(["--model-uri", "m", "--splits", str(tmp_path)]), 8)
