"""`raydiff run` of a sweep killed (SIGKILL, driver only) after its first trial finished and while the second
trains, then run again: Ray Tune's experiment restore keeps the finished trial, the interrupted one resumes its Ray
Train checkpoint in the same MLflow run, the rest run. Real CLI processes, each with its own local Ray."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.pipelines.cli_driver import cli_env, kill_driver, rerun, start_driver

pytestmark = pytest.mark.slow

PIPELINE = """
name: sweep-resume
tracking: {{uri: "sqlite:///{tmp}/mlruns.db", experiment: sweep-resume}}
storage: {{root: "{tmp}/store"}}
cluster: {{address: local, num_cpus: 4}}
stages:
  ingest: {{image: {{size: 8, channels: 1}}, shard: {{samples_per_shard: 512}}}}
  sweep:
    needs: [ingest]
    train: {{model: {{preset: tiny}}, schedule: {{num_timesteps: 100}}, steps: 80, batch_size: 32, workers: 1,
            warmup_steps: 5, log_every: 10, checkpoint_every: 10, eval_every: 10, eval_batches: 1, eval_batch_size: 16,
            sample_grid: 4, sample_ddpm_steps: 2, sample_ddim_steps: 2, max_failures: 0}}
    search: {{train.lr: {{grid: [1.0e-3, 3.0e-4, 1.0e-4]}}}}
    num_trials: 1
    max_concurrent: 1
    metric: {{name: val_bpd, mode: min}}
"""


def finished_in_tune_state(sweep_dir: Path) -> set[int]:
    """Indices of trials Tune's saved experiment state records as TERMINATED."""
    done = set()
    for path in sweep_dir.glob("tune/sweep/experiment_state-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for entry in data.get("trial_data", []):
            trial = json.loads(entry[0])
            if trial.get("status") == "TERMINATED":
                done.add(int(trial["trial_id"].rsplit("_", 1)[-1]))
    return done


def checkpoint_registered(trial_dir: Path) -> bool:
    snapshot = trial_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "checkpoint_" in snapshot.read_text()


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.format(tmp=tmp_path))
    first = start_driver(pipeline, tmp_path)
    try:
        deadline = time.time() + 400
        while True:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "trial 0 did not finish, or trial 1 did not checkpoint, in time"
            sweep_dirs = list(tmp_path.glob("store/stages/sweep-*"))
            if sweep_dirs and 0 in finished_in_tune_state(sweep_dirs[0]) and checkpoint_registered(
                    sweep_dirs[0] / "trials" / "trial-001"):
                break
            time.sleep(0.2)
        kill_driver(first)
    finally:
        if first.poll() is None:
            first.kill()
    sweep_dir = sweep_dirs[0]
    assert not (sweep_dir / "raydiff-stage.json").exists(), "the sweep finished before the kill"
    assert not (sweep_dir / "trials" / "trial-001" / "trial_result.json").exists(), "trial 1 finished before the kill"
    sweep_run_id = (sweep_dir / "mlflow_run_id.txt").read_text().strip()
    trial_runs = {i: (sweep_dir / "trials" / f"trial-{i:03d}" / "mlflow_run_id.txt").read_text().strip()
                  for i in (0, 1)}

    second = rerun(pipeline, tmp_path)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
    assert "[raydiff] ingest     cached" in second.stdout and "[raydiff] sweep      done" in second.stdout
    assert "resuming the Tune experiment" in second.stdout + second.stderr

    record = json.loads((sweep_dir / "raydiff-stage.json").read_text())
    assert record["run_id"] == sweep_run_id and len(record["values"]["trials"]) == 3
    assert {t["status"] for t in record["values"]["trials"]} == {"finished"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    starts = {i: [m.value for m in client.get_metric_history(run, "start_step")] for i, run in trial_runs.items()}
    assert starts[0] == [0.0], starts  # the finished trial was not run again
    assert starts[1][0] == 0 and len(starts[1]) == 2 and 0 < starts[1][-1] < 80, starts  # resumed, same run
    sweep_run = client.get_run(sweep_run_id)
    assert sweep_run.info.status == "FINISHED"
    children = client.search_runs([sweep_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    parents = client.search_runs([sweep_run.info.experiment_id], "tags.`raydiff.role` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    assert sweep_run.data.tags["mlflow.parentRunId"] == parents[1].info.run_id

    status = subprocess.run([sys.executable, "-m", "pipelines.sweep.status", str(pipeline)], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "3 finished" in status.stdout and "best so far: trial-" in status.stdout
