"""Remote storage against local storage, same run: the default pipeline (configs/local.yaml, `raydiff run
--no-serve-wait`, each run its own local Ray and MLflow store) once with `storage.root` on a local disk and once on
S3 (moto's S3 server on loopback, a real S3 HTTP API). Reports the wall time of the train stage and of the whole
pipeline (target: S3 ≥ 0.9× local, i.e. at most 11% slower) and the time each checkpoint took to save and upload
(`checkpoint_seconds`, logged by the training loop).

    python -m benchmarks.storage [--steps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmarks.report import Row, emit
from tests.conftest import free_port
from tests.s3server import CREDENTIALS, moto_server, s3_bucket

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(tmp: Path, storage_root: str, extra_env: dict[str, str], sets: list[str]) -> dict[str, float]:
    """Run the default pipeline into a fresh MLflow store; returns its wall time, the train stage's time and the
    mean checkpoint time."""
    tmp.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"PYTHONPATH": str(ROOT), "RAYDIFF_CACHE_DIR": str(tmp / "cache"), **extra_env})
    store = f"sqlite:///{tmp / 'mlruns.db'}"
    command = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs" / "local.yaml"), "--no-serve-wait",
               f"--set=storage.root={storage_root}", f"--set=tracking.uri={store}",
               f"--set=deploy.port={free_port()}", *sets]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(store)
    [train] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 "tags.`raydiff.stage` = 'train'")
    checkpoints = [m.value for m in client.get_metric_history(train.info.run_id, "checkpoint_seconds")]
    return {"pipeline": seconds, "train": train.data.metrics["stage_seconds"],
            "checkpoint": statistics.mean(checkpoints), "checkpoints": len(checkpoints)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the pipeline's own)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sets = [f"--set=steps={args.steps}"] if args.steps else []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as directory, moto_server() as endpoint:
        tmp = Path(directory)
        bucket = s3_bucket(endpoint, "bench")
        remote_root = bucket.replace("bench?", "bench/pipelines?")
        local = run_pipeline(tmp / "local", str(tmp / "local" / "store"), {}, sets)
        remote = run_pipeline(tmp / "s3", remote_root, {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{endpoint}"}, sets)
    rows = [Row("train stage wall time, S3 vs local storage", remote["train"], local["train"], "s", "≥ 0.9x", True),
            Row("whole pipeline wall time, S3 vs local storage", remote["pipeline"], local["pipeline"], "s", "≥ 0.9x",
                True),
            Row(f"per checkpoint save + upload ({remote['checkpoints']} checkpoints), S3 vs local",
                remote["checkpoint"], local["checkpoint"], "s", "report", True)]
    emit(rows, args.json, "storage: S3 (moto on loopback) vs local disk")


if __name__ == "__main__":
    main()
