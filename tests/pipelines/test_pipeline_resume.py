"""`raydiff run` killed (SIGKILL, driver only) mid-train, then re-run: training continues from its checkpoint in
the same MLflow run and the rest of the pipeline runs. Real CLI processes, each with its own local Ray."""

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.pipelines.cli_driver import kill_driver, rerun, start_driver

STEPS = 120
pytestmark = pytest.mark.slow

PIPELINE = """
name: resume-tiny
tracking: {{uri: "sqlite:///{tmp}/mlruns.db", experiment: resume}}
storage: {{root: "{tmp}/store"}}
cluster: {{address: local, num_cpus: 4}}
stages:
  ingest: {{image: {{size: 8, channels: 1}}, shard: {{samples_per_shard: 512}}}}
  train:
    needs: [ingest]
    model: {{preset: tiny}}
    schedule: {{num_timesteps: 100}}
    steps: {steps}
    batch_size: 32
    workers: 2
    warmup_steps: 10
    checkpoint_every: 10
    eval_every: 0
    eval_batches: 1
    eval_batch_size: 16
    sample_grid: 4
    sample_ddim_steps: 2
    sample_ddpm_steps: 2
  evaluate: {{needs: [train], bpd_batches: 1, bpd_batch_size: 16, samplers: [ddim-2], num_fid_samples: 16,
             sample_batch_size: 16}}
  register: {{needs: [evaluate], model_name: resume-tiny}}
"""


def checkpoint_registered(tmp_path: Path) -> bool:
    """Ray Train has recorded a checkpoint (it writes the directory first, then its snapshot naming it)."""
    snapshots = list(tmp_path.glob("store/stages/train-*/ray/train/checkpoint_manager_snapshot.json"))
    return bool(snapshots) and "checkpoint_" in snapshots[0].read_text()


def test_killed_driver_resumes_training_then_finishes(tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.format(tmp=tmp_path, steps=STEPS))
    first = start_driver(pipeline, tmp_path)
    try:
        deadline = time.time() + 400
        while not checkpoint_registered(tmp_path):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no training checkpoint appeared"
            time.sleep(0.2)
        lingering = kill_driver(first)  # Ray's processes share the driver's fate ...
        # ... except two idle agents that linger: no training may go on behind the resumed run's back
        assert not [name for name in lingering if name not in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")]
    finally:
        if first.poll() is None:
            first.kill()
    train_dir = next(tmp_path.glob("store/stages/train-*"))
    assert not (train_dir / "raydiff-stage.json").exists(), "training finished before the kill; raise STEPS"
    train_run_id = (train_dir / "mlflow_run_id.txt").read_text().strip()

    second = rerun(pipeline, tmp_path)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
    out = second.stdout
    assert "[raydiff] ingest     cached" in out and "[raydiff] train      started" in out
    assert "[raydiff] register   done" in out and "closed run" in out

    record = json.loads((train_dir / "raydiff-stage.json").read_text())
    assert record["values"]["final_step"] == STEPS and record["run_id"] == train_run_id
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    starts = [m.value for m in client.get_metric_history(train_run_id, "start_step")]
    assert starts[0] == 0 and len(starts) >= 2 and 0 < starts[-1] < STEPS, starts
    train_run = client.get_run(train_run_id)
    assert train_run.info.status == "FINISHED"
    parents = client.search_runs([train_run.info.experiment_id], "tags.`raydiff.role` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    assert train_run.data.tags["mlflow.parentRunId"] == parents[1].info.run_id
