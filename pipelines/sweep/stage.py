"""The sweep stage: Ray Tune trials of the train stage's training (pipelines.sweep.trial), early stopping by ASHA,
MLflow bookkeeping, and the best finished trial's model as the stage's output.

MLflow: the stage's own run (nested under the pipeline run) holds the search space, the trials table and the
metric-vs-parameters plot; each trial is a child run of it (its training run: params, curves, samples) tagged
`raydiff.trial_status` = finished / stopped_early / failed (MLflow status FINISHED / KILLED / FAILED); the best
trial is tagged `raydiff.sweep_best`. The stage's values are the best trial's train-stage values (model_uri, run_id,
final_step, checkpoint), so evaluate reads a sweep as it reads a train stage.

Resume: the Tune experiment lives in `<stage dir>/tune/sweep`; a rerun of the same stage (same cache key, so the
same directory) restores it with `Tuner.restore`: finished and failed trials stay as they are, unfinished ones run
again and resume their Ray Train run and MLflow run from their trial directory. The stage's MLflow run is reopened
the same way (its id is kept in the stage directory).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.hashing import hash_files
from pipelines.stage import StageContext, StageKind, StageResult
from pipelines.sweep.config import SweepConfig, VAL_METRICS
from pipelines.sweep.report import (FAILED, FINISHED, PENDING, RUNNING, STOPPED, SweepStatus, TrialRow,
                                    plot_metric_vs_params, progress_printer, write_trials_csv)
from pipelines.sweep.trial import RESULT_FILE, TRIAL_ACTOR_CPUS, error_line, trial_dir, trial_index
from pipelines.tracking import ensure_experiment, flatten, run_tags
from pipelines.train.checkpoint import STATE_FILE

RUN_ID_FILE = "mlflow_run_id.txt"  # the stage's run id here, each trial's in its directory (run_training)
EXPERIMENT_NAME = "sweep"
STATE_SAVE_S = 2  # seconds between saves of the Tune experiment state
MLFLOW_STATUS = {FINISHED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}


class SweepFailed(RuntimeError):
    pass


@dataclass
class SweepResult:
    best: TrialRow
    status: SweepStatus
    artifacts: list[Path]


def trial_resources(config: SweepConfig) -> dict[str, float]:
    """What max_concurrent trials need at once (each: its Ray Train workers and the trial actor), from the file."""
    train, n = config.train, config.max_concurrent
    needed = {"CPU": n * (train.workers * train.cpus_per_worker + TRIAL_ACTOR_CPUS)}
    return {**needed, "GPU": float(n * train.workers)} if train.use_gpu else needed


def run_sweep(config: SweepConfig, train_dir: Path, val_dir: Path | None, output_dir: Path, tracking_uri: str,
              experiment: str, sweep_run_id: str, stage: str = "sweep",
              log: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep's Tune experiment in output_dir; Ray must be initialised. Returns the best trial."""
    from ray import tune

    from pipelines.resources import wait_for_resources
    from pipelines.sweep.progress import LIVE, Progress
    from pipelines.sweep.trial import SweepTrial

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.metric.name in VAL_METRICS and val_dir is None:
        raise ValueError(f"stages.{stage}.metric.name: {config.metric.name} needs a validation split, and the "
                         "ingest stage wrote none (set its split.val above 0)")
    wait_for_resources(trial_resources(config), config.resource_wait_s,
                       f"stages.{stage}.max_concurrent ({config.max_concurrent} trials at once)", log)
    ensure_experiment(tracking_uri, experiment)  # before trials start, so they do not race to create the store

    status = SweepStatus(stage=stage, metric=config.metric.name, mode=config.metric.mode, steps=config.train.steps,
                         total=config.total_trials())
    context = {"train": config.train.model_dump(mode="json"), "train_dir": str(Path(train_dir).resolve()),
               "val_dir": str(Path(val_dir).resolve()) if val_dir else None, "sweep_dir": str(output_dir),
               "tracking_uri": tracking_uri, "experiment": experiment, "sweep_run_id": sweep_run_id, "stage": stage}
    trainable = tune.with_resources(tune.with_parameters(SweepTrial, context=context), {"CPU": TRIAL_ACTOR_CPUS})
    storage, path = output_dir / "tune", output_dir / "tune" / EXPERIMENT_NAME
    LIVE[str(output_dir)] = (status, progress_printer(status, log))  # a restored experiment's callback finds it too
    progress = Progress(str(output_dir))
    if tune.Tuner.can_restore(str(path)):
        log(f"[raydiff sweep] {stage}: resuming the Tune experiment in {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        _reload_rows(status, path, config)
    else:
        tuner = _new_tuner(config, trainable, storage, progress)
    log(f"[raydiff sweep] {stage}: {status.total} trials, {config.max_concurrent} at a time, "
        f"{config.metric.mode} {config.metric.name}" + (f", ASHA from step {config.scheduler.grace_steps}"
                                                        if config.scheduler else ""))
    grid = _fit(tuner, output_dir)
    _collect(status, grid, output_dir)
    status.write(output_dir)
    return SweepResult(best=status.best(finished_only=True), status=status, artifacts=[])


def _new_tuner(config: SweepConfig, trainable, storage: Path, progress):
    """A fresh Tune experiment under `storage`: the search space, ASHA when configured, the concurrency limit."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = None
    if config.scheduler is not None:
        # No rung at the last step (max_t below it, and trials past max_t are not stopped): a trial's final report
        # is followed by logging its model, which a stop would cut short.
        scheduler = ASHAScheduler(time_attr="step", grace_period=config.scheduler.grace_steps,
                                  max_t=config.train.steps - 1, reduction_factor=config.scheduler.reduction_factor,
                                  stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space={key: domain.to_tune() for key, domain in config.search.items()},
        tune_config=tune.TuneConfig(
            metric=config.metric.name, mode=config.metric.mode, num_samples=config.num_trials,
            scheduler=scheduler,
            # the concurrency limit goes to the generator: Tune ignores max_concurrent_trials beside a given one
            search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=config.max_concurrent),
            trial_dirname_creator=lambda trial: f"trial-{trial_index(trial.trial_id):03d}"),
        run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=[progress]),
    )


def _fit(tuner, output_dir: Path):
    """Run the experiment to its end (saving its state every few seconds); the live progress entry is dropped."""
    from pipelines.sweep.progress import LIVE

    # Tune saves the experiment state at most every 10 s by default; a driver killed in between would run trials
    # again that had finished. The state of a sweep is small, so save it every few seconds.
    saved = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = saved or str(STATE_SAVE_S)
    try:
        return tuner.fit()
    finally:
        LIVE.pop(str(output_dir), None)
        if saved is None:
            os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)


def _reload_rows(status: SweepStatus, path: Path, config: SweepConfig) -> None:
    """Rows of trials from an earlier driver (the status file it left), so progress counts them."""
    from pipelines.sweep.report import STATUS_FILE

    previous = path.parents[1] / STATUS_FILE
    if previous.is_file():
        for trial_id, row in SweepStatus.from_json(json.loads(previous.read_text())).trials.items():
            if row.status == RUNNING:
                row.status = PENDING
            status.trials[trial_id] = row


def _collect(status: SweepStatus, grid, sweep_dir: Path) -> None:
    """Every trial's final state from Tune's result grid and the files its trainable left."""
    for result in grid:
        metrics = result.metrics or {}
        name = Path(result.path).name  # trial-NNN (trial_dirname_creator)
        index = trial_index(metrics["trial_id"]) if "trial_id" in metrics else int(name.rsplit("-", 1)[-1])
        row = next((r for r in status.trials.values() if r.index == index), None)
        if row is None:
            trial_id = metrics.get("trial_id", name)
            row = status.trials[trial_id] = TrialRow(index=index, trial_id=trial_id, params=dict(result.config or {}))
        metrics = result.metrics or {}
        if status.metric in metrics:
            row.value = float(metrics[status.metric])
        row.step = int(metrics.get("step", row.step))
        directory = trial_dir(sweep_dir, index)
        summary_file = directory / RESULT_FILE
        marker = directory / RUN_ID_FILE
        row.run_id = marker.read_text().strip() if marker.is_file() else row.run_id
        if result.error is not None:
            row.status = FAILED
            row.error = row.error or _exception_line(result.error)
        elif summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            row.status, row.model_uri = FINISHED, summary["model_uri"]
            row.run_id, row.checkpoint_path = summary["run_id"], summary["checkpoint_path"]
            row.step = int(summary["final_step"])
        else:
            row.status = STOPPED


def _exception_line(error: BaseException) -> str:
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return error_line(text) or (lines[-1] if lines else type(error).__name__)


# ---- MLflow ---------------------------------------------------------------------------------------------------


def record_trials(client, status: SweepStatus, sweep_run_id: str, experiment_id: str, best: TrialRow | None) -> None:
    """Tag every trial's child run with its status (creating a run for a trial that failed before it made one)."""
    from mlflow.entities import Param, RunTag

    for row in sorted(status.trials.values(), key=lambda r: r.index):
        if row.run_id is None:
            row.run_id = client.create_run(experiment_id, run_name=f"{status.stage}/trial-{row.index}", tags=run_tags(
                **{"mlflow.parentRunId": sweep_run_id})).info.run_id
            client.log_batch(row.run_id, params=[Param(k, str(v)) for k, v in row.params.items()])
        tags = {"raydiff.trial_status": row.status, "raydiff.trial_index": str(row.index),
                "raydiff.trial_id": row.trial_id, "raydiff.sweep_params": json.dumps(row.params, default=str),
                "raydiff.sweep_best": str(best is not None and row.trial_id == best.trial_id).lower()}
        if row.error:
            tags["raydiff.error"] = row.error[:5000]
        client.log_batch(row.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(row.run_id, status=MLFLOW_STATUS.get(row.status, "KILLED"))


def _open_sweep_run(ctx: StageContext, experiment_id: str) -> str:
    """Reopen the run recorded in the stage directory (a resumed sweep, moved under this pipeline run) or create it."""
    client = ctx.mlflow()
    marker = ctx.output_dir / RUN_ID_FILE
    if marker.is_file():
        run_id = marker.read_text().strip()
        client.set_tag(run_id, "mlflow.parentRunId", ctx.parent_run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = client.create_run(experiment_id, run_name=ctx.stage,
                               tags=run_tags(**{"mlflow.parentRunId": ctx.parent_run_id, "raydiff.role": "sweep"})).info.run_id
    params: SweepConfig = ctx.params
    from mlflow.entities import Param

    flat = flatten({k: v for k, v in params.model_dump(mode="json").items() if k != "search"})
    flat.update({f"search.{key}": json.dumps({d.kind: d.spec}) for key, d in params.search.items()})
    items = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])
    client.log_dict(run_id, {key: {d.kind: d.spec} for key, d in params.search.items()}, "sweep/search_space.json")
    marker.write_text(run_id)
    return run_id


def run(ctx: StageContext) -> StageResult:
    params: SweepConfig = ctx.params
    splits = ctx.inputs["data"].values["splits"]
    client = ctx.mlflow()
    experiment_id = ensure_experiment(ctx.tracking_uri, ctx.experiment)
    run_id = _open_sweep_run(ctx, experiment_id)
    try:
        result = run_sweep(params, ctx.localize(splits["train"]),
                           ctx.localize(splits["val"]) if "val" in splits else None, ctx.output_dir, ctx.tracking_uri,
                           ctx.experiment, run_id, stage=ctx.stage)
        status, best = result.status, result.best
        record_trials(client, status, run_id, experiment_id, best)
        sweep_dir = ctx.output_dir / "sweep"
        sweep_dir.mkdir(exist_ok=True)
        artifacts = [write_trials_csv(status, sweep_dir / "trials.csv")]
        log_keys = {k for k, d in params.search.items() if d.kind == "loguniform"}
        if any(r.value is not None for r in status.trials.values()):
            artifacts.append(plot_metric_vs_params(status, log_keys, sweep_dir / "metric_vs_params.png"))
        for path in artifacts:
            client.log_artifact(run_id, str(path), "sweep")
        counts = status.counts()
        if best is None:
            errors = "; ".join(f"trial-{r.index}: {r.error or r.status}"
                               for r in sorted(status.trials.values(), key=lambda r: r.index))
            raise SweepFailed(f"no trial of {len(status.trials)} finished ({errors})")
        metrics = {f"best_{params.metric.name}": best.value, "best_trial": best.index,
                   "trials_finished": counts[FINISHED], "trials_stopped_early": counts[STOPPED],
                   "trials_failed": counts[FAILED]}
        client.log_batch(run_id, tags=_tags({"raydiff.best_trial": f"trial-{best.index}",
                                             "raydiff.best_trial_run_id": best.run_id,
                                             "raydiff.best_model_uri": best.model_uri}))
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    checkpoint = Path(best.checkpoint_path)
    return StageResult(
        values={"model_uri": best.model_uri, "run_id": best.run_id, "final_step": best.step,
                "checkpoint": ctx.uri_of(checkpoint), "sweep_run_id": run_id, "best_trial": best.index,
                "metric": params.metric.name, "value": best.value,
                "trials": [{"trial": r.index, "status": r.status, "value": r.value, "run_id": r.run_id,
                            "params": r.params} for r in sorted(status.trials.values(), key=lambda r: r.index)]},
        metrics=metrics, content_hash=hash_files([checkpoint / STATE_FILE]), run_id=run_id)


def _tags(values: dict[str, str | None]):
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in values.items() if v is not None]


KIND = StageKind(name="sweep", params="pipelines.sweep.config:SweepConfig", run=run, inputs={"data": ("ingest",)},
                 version="1", resources={"num_cpus": 0}, owns_run=True)
