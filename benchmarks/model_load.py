"""Model load time and size on disk: the safetensors directory (`DiffusionModel.from_pretrained`, config.json +
model.safetensors) against the pickled module the training stage logged before (`torch.save` of the whole
DiffusionModel, what `mlflow.pytorch.log_model(serialization_format="pickle")` writes and `torch.load(...,
weights_only=False)` reads back). Same run, same weights, interleaved rounds; the paper's CIFAR-10 U-Net (35.7M
parameters) by default, `--preset small` for the digits model. Also the same two through MLflow
(`pipelines.modelstore.load_model` of the pyfunc-logged directory vs `mlflow.pytorch.load_model`), with --mlflow.

    python -m benchmarks.model_load [--preset cifar10|small] [--rounds N] [--mlflow] [--json PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import Row, emit, interleaved
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def mlflow_rows(model: DiffusionModel, tmp: Path, rounds: int) -> list[Row]:
    """Load through MLflow: the pyfunc-logged safetensors directory vs the pickled mlflow.pytorch model."""
    import mlflow
    import mlflow.pytorch

    from pipelines.modelstore import load_model, log_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlruns.db'}")
    experiment = mlflow.create_experiment("load", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        log_model(model, name="safetensors")
        mlflow.pytorch.log_model(model, name="pickle", serialization_format="pickle", pip_requirements=["torch"])
    uri = f"runs:/{run.info.run_id}"
    times = interleaved({"ours": lambda: timed(lambda: load_model(f"{uri}/safetensors")),
                         "pickle": lambda: timed(lambda: mlflow.pytorch.load_model(f"{uri}/pickle"))}, rounds)
    return [Row("load from MLflow (runs:/…), s", times["ours"], times["pickle"], "s", "<= 1.0x pickle's time",
                lower_is_better=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cifar10", "small"], default="cifar10")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mlflow", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset(args.preset)), "linear", 1000).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "safetensors")
        torch.save(model, tmp / "model.pth")
        times = interleaved({
            "ours": lambda: timed(lambda: DiffusionModel.from_pretrained(tmp / "safetensors")),
            "pickle": lambda: timed(lambda: torch.load(tmp / "model.pth", weights_only=False)),
        }, args.rounds)
        rows = [Row(f"load {args.preset} model from local files, s", times["ours"], times["pickle"], "s",
                    "<= 1.0x pickle's time", lower_is_better=True),
                Row("size on disk, MB", size_mb(tmp / "safetensors"), size_mb(tmp / "model.pth"), "MB",
                    "about the same", lower_is_better=True)]
        if args.mlflow:
            rows += mlflow_rows(model, tmp, args.rounds)
    emit(rows, args.json, f"model load: safetensors directory vs pickled module ({args.preset})")


if __name__ == "__main__":
    main()
