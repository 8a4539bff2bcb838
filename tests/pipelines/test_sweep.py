"""The sweep stage on the shared test Ray with real Ray Tune, Ray Train and a sqlite MLflow store: a tiny U-Net,
4 trials (lr × batch_size grid: one good, one hopeless, two that fail), 2 at a time, ASHA early stopping on val_bpd;
then evaluate on the sweep's output, a cached rerun, an all-failing sweep, and the checks made before anything runs."""

import copy
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.runner.execute import PipelineFailed, run_pipeline
from pipelines.spec import SpecError, build_spec
from pipelines.sweep.config import SweepConfig, trial_config
from pipelines.sweep.report import FAILED, FINISHED, STOPPED, SweepStatus, TrialRow, find_status_files, select_best
from pipelines.resources import ResourcesUnavailable, wait_for_resources
from pipelines.sweep.stage import trial_resources

pytestmark = pytest.mark.slow

TINY_TRAIN = {"model": {"preset": "tiny"}, "schedule": {"num_timesteps": 100}, "steps": 40, "batch_size": 32,
              "workers": 1, "cpus_per_worker": 1.0, "lr": 1e-3, "warmup_steps": 5, "log_every": 10,
              "checkpoint_every": 10, "keep_checkpoints": 1, "eval_every": 10, "eval_batches": 1,
              "eval_batch_size": 16, "sample_grid": 4, "sample_ddpm_steps": 2, "sample_ddim_steps": 2,
              "ema": {"half_life_steps": 5}, "max_failures": 0}
SWEEP = {"needs": ["ingest"], "kind": "sweep", "train": TINY_TRAIN,
         # grid order: the last key varies fastest → trial 0 (1e-3, 32) good, 1 and 3 fail (no full batch of 100000
         # images), 2 (1e-7, 32) learns nothing and reaches ASHA's first rung after trial 0 recorded a far better value
         # (one trial at a time makes that order certain; the all-failing sweep below runs two at once)
         "search": {"train.lr": {"grid": [1e-3, 1e-7]}, "train.batch_size": {"grid": [32, 100000]}},
         "num_trials": 1, "max_concurrent": 1, "metric": {"name": "val_bpd", "mode": "min"},
         "scheduler": {"kind": "asha", "grace_steps": 10}}
EVALUATE = {"needs": ["sweep"], "bpd_batches": 1, "bpd_batch_size": 16, "samplers": ["ddim-2"], "num_fid_samples": 16,
            "sample_batch_size": 16}


def pipeline(tmp_path: Path, mlflow_uri: str, sweep: dict, evaluate: bool = False) -> dict:
    stages = {"ingest": {"image": {"size": 8, "channels": 1}}, "sweep": sweep}
    if evaluate:
        stages["evaluate"] = EVALUATE
    return {"name": "sweep-test", "tracking": {"uri": mlflow_uri, "experiment": "sweep-test"},
            "storage": {"root": str(tmp_path / "store")}, "stages": stages}


@pytest.fixture(autouse=True)
def _spec_tracking_uri_wins(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ---- before anything runs -------------------------------------------------------------------------------------


def spec_errors(sweep: dict) -> list[str]:
    raw = {"name": "t", "stages": {"ingest": {}, "sweep": {**copy.deepcopy(SWEEP), **sweep}}}
    with pytest.raises(SpecError) as info:
        build_spec(raw)
    return info.value.errors


def test_search_space_parsing_and_trial_configs():
    config = SweepConfig.model_validate({
        "train": TINY_TRAIN, "num_trials": 3, "seed": 7,
        "search": {"train.lr": {"loguniform": [1e-4, 3e-3]}, "train.ema.decay": {"choice": [0.99, 0.999]},
                   "train.model.ch": {"grid": [16, 32]}, "train.schedule.name": {"choice": ["linear", "cosine"]},
                   "train.warmup_steps": {"randint": [0, 10]}}})
    assert config.total_trials() == 6  # num_trials × the grid's size
    assert {k: d.kind for k, d in config.search.items()} == {
        "train.lr": "loguniform", "train.ema.decay": "choice", "train.model.ch": "grid", "train.schedule.name": "choice",
        "train.warmup_steps": "randint"}
    trial = trial_config(config.train, {"train.lr": 5e-4, "train.model.ch": 32, "train.schedule.name": "cosine"})
    assert (trial.lr, trial.model.ch, trial.model.preset, trial.schedule.name) == (5e-4, 32, "tiny", "cosine")
    assert trial.steps == 40 and trial.ema.half_life_steps == 5  # everything else is the stage's train parameters
    from ray import tune

    domains = {k: d.to_tune() for k, d in config.search.items()}
    assert isinstance(domains["train.lr"], tune.search.sample.Float) and domains["train.model.ch"] == {
        "grid_search": [16, 32]}
    assert domains["train.warmup_steps"].upper == 11  # randint is inclusive here, Tune's upper bound is not


def test_bad_search_spaces_and_metrics_are_errors_naming_their_path():
    errors = spec_errors({"search": {"train.lrr": {"loguniform": [1e-4, 1e-3]}, "train.model.chh": {"grid": [16]},
                                     "train.ema.decay": {"uniform": [0.5, 1.5]}, "lr": {"choice": [1e-3]}}})
    assert any(e.startswith("stages.sweep.search.train.lrr: ") and "unknown" in e for e in errors), errors
    assert any(e.startswith("stages.sweep.search.train.model.chh: ") and "unknown" in e for e in errors), errors
    assert any(e.startswith("stages.sweep.search.train.ema.decay: uniform value 1.5") for e in errors), errors
    assert any(e.startswith("stages.sweep.search.lr: ") for e in errors), errors
    errors = spec_errors({"search": {"train.lr": {"loguniform": [3e-3, 1e-4]}, "train.steps": {"choice": []},
                                     "train.seed": {"randint": [5, 5]}, "train.ch": {"choice": [1], "grid": [2]}}})
    assert any(e.startswith("stages.sweep.search.train.lr: ") and "empty range" in e for e in errors), errors
    assert any(e.startswith("stages.sweep.search.train.steps: ") and "empty list" in e for e in errors), errors
    assert any(e.startswith("stages.sweep.search.train.seed: ") and "empty range" in e for e in errors), errors
    assert any(e.startswith("stages.sweep.search.train.ch: ") and "exactly one" in e for e in errors), errors
    errors = spec_errors({"metric": {"name": "val_bdp", "mode": "min"}})
    assert errors[0].startswith("stages.sweep.metric.name: training never logs 'val_bdp'"), errors
    errors = spec_errors({"train": {**TINY_TRAIN, "eval_every": 0}})
    assert errors[0].startswith("stages.sweep.metric.name: val_bpd is measured every train.eval_every (0"), errors
    errors = spec_errors({"scheduler": {"kind": "asha", "grace_steps": 40}})
    assert errors[0].startswith("stages.sweep.scheduler.grace_steps: 40 leaves no room"), errors
    errors = spec_errors({"max_concurrent": 0, "metric": {"name": "val_bpd", "mode": "best"}})
    assert {e.split(":")[0] for e in errors} == {"stages.sweep.max_concurrent", "stages.sweep.metric.mode"}, errors


def test_max_concurrent_beyond_the_cluster_waits_then_fails_naming_the_path(ray_session):
    """The trials' needs come from the file; a cluster that cannot hold them yet is waited for, then refused."""
    config = SweepConfig.model_validate({**{k: v for k, v in SWEEP.items() if k not in ("needs", "kind")},
                                         "max_concurrent": 5, "resource_wait_s": 1.0,
                                         "train": {**TINY_TRAIN, "cpus_per_worker": 2.0}})
    workers = config.train.workers
    assert trial_resources(config) == {"CPU": pytest.approx(5 * (workers * 2.0 + 0.01))}
    gpu = config.model_copy(update={"train": config.train.model_copy(update={"use_gpu": True})})
    assert trial_resources(gpu)["GPU"] == 5 * workers
    lines = []
    with pytest.raises(ResourcesUnavailable, match=r"stages.sweep.max_concurrent \(5 trials at once\) needs [\d.]+ CPU"):
        wait_for_resources(trial_resources(config), config.resource_wait_s,
                           "stages.sweep.max_concurrent (5 trials at once)", lines.append, poll_s=0.2)
    assert "waiting up to 1 s for the autoscaler" in lines[-1]


def test_best_trial_by_metric_and_mode():
    rows = [TrialRow(0, "a_00000", {}, FINISHED, 40, 3.0), TrialRow(1, "a_00001", {}, FINISHED, 40, 1.0),
            TrialRow(2, "a_00002", {}, STOPPED, 10, 0.5), TrialRow(3, "a_00003", {}, FAILED, 0, None),
            TrialRow(4, "a_00004", {}, FINISHED, 40, float("nan")), TrialRow(5, "a_00005", {}, FINISHED, 40, 5.0)]
    assert select_best(rows, "min", finished_only=True).index == 1
    assert select_best(rows, "min").index == 2  # best so far counts stopped trials' last report
    assert select_best(rows, "max", finished_only=True).index == 5
    assert select_best(rows[3:4], "min") is None


# ---- real sweeps ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    """One pipeline run: ingest → sweep → evaluate, and its MLflow store."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    raw = pipeline(tmp_path, uri, copy.deepcopy(SWEEP), evaluate=True)
    result = run_pipeline(build_spec(raw), log=print)
    return tmp_path, uri, raw, result


def test_trials_are_child_runs_with_status_and_the_best_feeds_evaluate(swept):
    tmp_path, uri, _, result = swept
    assert result.status == {"ingest": "done", "sweep": "done", "evaluate": "done"}
    record = result.records["sweep"]
    client = MlflowClient(uri)
    sweep_run = client.get_run(record.run_id)
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["mlflow.parentRunId"] == result.run_id
    assert sweep_run.data.params["search.train.lr"] == '{"grid": [0.001, 1e-07]}'
    assert {a.path for a in client.list_artifacts(record.run_id, "sweep")} == {
        "sweep/search_space.json", "sweep/trials.csv", "sweep/metric_vs_params.png"}

    trials = {int(r.data.tags["raydiff.trial_index"]): r for r in client.search_runs(
        [sweep_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{record.run_id}'")}
    assert sorted(trials) == [0, 1, 2, 3]
    statuses = {i: (r.data.tags["raydiff.trial_status"], r.info.status) for i, r in trials.items()}
    assert statuses == {0: ("finished", "FINISHED"), 1: ("failed", "FAILED"), 2: ("stopped_early", "KILLED"),
                        3: ("failed", "FAILED")}, statuses
    assert trials[0].data.params["train.lr"] == "0.001" and trials[2].data.params["train.lr"] == "1e-07"
    assert "no full batch" in trials[1].data.tags["raydiff.error"]
    # early stopping really stopped: trial 2 trained to a rung below the end and no further
    steps = [m.step for m in client.get_metric_history(trials[2].info.run_id, "loss")]
    assert steps and max(steps) < 40, steps
    assert max(m.step for m in client.get_metric_history(trials[0].info.run_id, "loss")) == 40

    # the best trial: the finished one with the lowest val_bpd, tagged, and the stage's output
    assert trials[0].data.tags["raydiff.sweep_best"] == "true"
    assert [i for i, r in trials.items() if r.data.tags["raydiff.sweep_best"] == "true"] == [0]
    values = record.values
    assert values["run_id"] == trials[0].info.run_id and values["model_uri"] == f"runs:/{values['run_id']}/model"
    assert values["final_step"] == 40 and values["best_trial"] == 0 and Path(values["checkpoint"]).is_dir()
    assert values["value"] == pytest.approx(trials[0].data.metrics["val_bpd"])
    assert sweep_run.data.metrics["trials_stopped_early"] == 1 and sweep_run.data.metrics["trials_failed"] == 2
    assert result.records["evaluate"].values["metrics"]["test_bpd"] > 0  # evaluate read the best trial's model

    status_file = find_status_files(tmp_path / "store", "sweep")[0]
    status = SweepStatus.from_json(json.loads(status_file.read_text()))
    assert status.counts()["finished"] == 1 and status.best(finished_only=True).index == 0
    assert any("best so far: trial-0" in line for line in status.lines())


def test_rerun_with_the_same_search_space_and_seed_is_cached(swept):
    tmp_path, uri, raw, first = swept
    again = run_pipeline(build_spec(raw), log=print)
    assert again.status == {"ingest": "cached", "sweep": "cached", "evaluate": "cached"}
    assert again.records["sweep"].values == first.records["sweep"].values
    changed = copy.deepcopy(raw)
    changed["stages"]["sweep"]["seed"] = 1
    spec = build_spec(changed)
    from pipelines.cache import stage_key
    from pipelines.kinds import load_kind

    kind = load_kind("sweep")
    hashes = {"ingest": first.records["ingest"].content_hash}
    assert stage_key(kind, spec.stages["sweep"].params_json(), hashes) != first.records["sweep"].key


def test_a_sweep_whose_every_trial_fails_names_their_errors(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    sweep = {**copy.deepcopy(SWEEP), "search": {"train.batch_size": {"grid": [5000, 100000]}}, "scheduler": None,
             "max_concurrent": 2}
    with pytest.raises(PipelineFailed) as info:
        run_pipeline(build_spec(pipeline(tmp_path, uri, sweep)), log=print)
    message = str(info.value)
    assert "stage 'sweep' failed" in message and "no trial of 2 finished" in message
    assert "trial-0: " in message and "trial-1: " in message and "no full batch" in message
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                              "tags.`raydiff.trial_status` = 'failed'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
