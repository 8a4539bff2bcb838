"""Sweeps, each number against a baseline measured in the same run (real `raydiff run` processes, own local Ray):

1. An 8-trial sweep (lr loguniform, val_bpd, 2 trials at a time, ASHA stopping the worse half at each rung) on the
   embedded digits: its wall time vs the same 8 trainings (the lr values the sweep drew) run one after another with
   `raydiff run` of a train pipeline (target ≥ 1.3× faster).
2. Overhead of one Tune trial: the sweep stage's time with one trial vs the train stage's time for the same
   configuration (target ≤ 10%, i.e. ratio ≥ 0.91); `--repeats N` runs the pair N times, alternating, each in its
   own store, and compares the medians.

Ingest is run once first and is a cache hit in every measured run.

    python -m benchmarks.sweep [--quick] [--repeats N] [--overhead-only] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.report import Row, emit

ROOT = Path(__file__).resolve().parents[1]


def train_params(steps: int, every: int) -> dict:
    return {"model": {"preset": "small"}, "steps": steps, "batch_size": 64, "workers": 1, "cpus_per_worker": 1.0,
            "lr": 1.0e-3, "warmup_steps": 20, "ema": {"half_life_steps": 50}, "log_every": every,
            "checkpoint_every": every, "eval_every": every, "eval_batches": 1, "eval_batch_size": 16,
            "sample_grid": 16, "sample_ddpm_steps": 50, "sample_ddim_steps": 10, "keep_checkpoints": 1}


def pipeline(tmp: Path, name: str, stages: dict) -> Path:
    raw = {"name": name, "tracking": {"uri": f"sqlite:///{tmp}/mlruns.db", "experiment": "bench-sweep"},
           "storage": {"root": str(tmp / "store")}, "cluster": {"address": "local", "num_cpus": 4},
           "stages": {"ingest": {"image": {"size": 8, "channels": 1}, "shard": {"samples_per_shard": 512}}, **stages}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def raydiff_run(path: Path, tmp: Path, *sets: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "pipelines.cli", "run", str(path), "--no-serve-wait",
               *[f"--set={s}" for s in sets]]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def record(tmp: Path, kind: str) -> dict:
    """The newest record of a stage kind under tmp's store."""
    files = sorted(tmp.glob(f"store/stages/{kind}-*/raydiff-stage.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text())


def sweep_vs_sequential(tmp: Path, sweep: dict, train: dict) -> Row:
    """The 8-trial sweep's wall time against the same 8 trainings as one `raydiff run` each."""
    train_file = pipeline(tmp, "bench-train", {"train": {"needs": ["ingest"], **train}})
    raydiff_run(pipeline(tmp, "bench-ingest", {}), tmp)  # ingest once; cached below
    sweep_seconds = raydiff_run(pipeline(tmp, "bench-sweep", {"sweep": sweep}), tmp)
    trials = record(tmp, "sweep")["values"]["trials"]
    counts = {s: sum(t["status"] == s for t in trials) for s in ("finished", "stopped_early", "failed")}
    print(f"[bench sweep] 8-trial sweep {sweep_seconds:.0f}s: {counts}", flush=True)
    sequential = 0.0
    for i, trial in enumerate(trials):
        seconds = raydiff_run(train_file, tmp, f"train.lr={trial['params']['train.lr']}")
        sequential += seconds
        print(f"[bench sweep] raydiff run {i + 1}/8 (lr {trial['params']['train.lr']:.3g}) {seconds:.0f}s", flush=True)
    return Row("8 trainings: sweep (2 at a time, ASHA) vs 8 raydiff runs", sweep_seconds, sequential, "s", "≥ 1.3x",
               lower_is_better=True)


def one_trial_overhead(tmp: Path, sweep: dict, train: dict, repeats: int) -> Row:
    """The sweep stage's seconds with one trial against the train stage's for the same configuration: medians of
    `repeats` alternating pairs, each pair in its own store (one sweep record, one train record)."""
    one = {**sweep, "search": {"train.lr": {"grid": [1.0e-3]}}, "num_trials": 1, "max_concurrent": 1,
           "scheduler": None}
    trial_stages, train_stages = [], []
    for k in range(repeats):
        alone = tmp / f"one-{k}"
        alone.mkdir()
        raydiff_run(pipeline(alone, "bench-ingest", {}), alone)
        raydiff_run(pipeline(alone, "bench-one-trial", {"sweep": one}), alone)
        raydiff_run(pipeline(alone, "bench-train", {"train": {"needs": ["ingest"], **train}}), alone)
        trial_stages.append(record(alone, "sweep")["seconds"])
        train_stages.append(record(alone, "train")["seconds"])
        print(f"[bench sweep] one configuration ({k + 1}/{repeats}): sweep stage {trial_stages[-1]:.1f}s, "
              f"train stage {train_stages[-1]:.1f}s", flush=True)
    what = "one configuration: sweep stage (1 Tune trial) vs train stage"
    if repeats > 1:
        what += f", medians of {repeats}"
    return Row(what, statistics.median(trial_stages), statistics.median(train_stages), "s",
               "≥ 0.91x (≤ 10% overhead)", lower_is_better=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the one-configuration pair")
    parser.add_argument("--overhead-only", action="store_true", help="only the one-configuration pair")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    steps, every = (120, 20) if args.quick else (240, 40)
    train = train_params(steps, every)
    sweep = {"needs": ["ingest"], "train": train, "search": {"train.lr": {"loguniform": [1.0e-4, 3.0e-3]}},
             "num_trials": 8, "max_concurrent": 2, "metric": {"name": "val_bpd", "mode": "min"},
             "scheduler": {"kind": "asha", "grace_steps": every, "reduction_factor": 2}, "seed": 0}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as directory:
        tmp = Path(directory)
        if not args.overhead_only:
            rows.append(sweep_vs_sequential(tmp, sweep, train))
        rows.append(one_trial_overhead(tmp, sweep, train, args.repeats))
    emit(rows, args.json, "sweeps")


if __name__ == "__main__":
    main()
