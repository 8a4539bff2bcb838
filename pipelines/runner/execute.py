"""The DAG executor: each stage a Ray task with its resources, independent stages in parallel, cached stages
skipped, failed stages retried, everything recorded in MLflow.

Only small JSON records (artifact URIs, model URIs, metrics) pass through the driver; stages read and write their
data at the URIs in those records.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ray
from mlflow.tracking import MlflowClient

from pipelines.cache import read_record, stage_dir_name, stage_key
from pipelines.dag import resolve_inputs, stage_order
from pipelines.kinds import load_kind
from pipelines.runner import runs
from pipelines.runner.task import TaskInfo, restore_stage_task, run_stage_task
from pipelines.spec import PipelineSpec
from pipelines.stage import StageRecord
from pipelines.stage_board import stage_line
from pipelines.storage import Storage
from pipelines.tracking import ensure_experiment, resolve_tracking_uri

HEARTBEAT_S = 60.0


@dataclass
class PipelineResult:
    pipeline: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    mlflow_url: str
    storage_root: str
    status: dict[str, str] = field(default_factory=dict)  # stage → cached | done | failed | skipped
    records: dict[str, StageRecord] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def values_of_kind(self, kind: str, key: str) -> list:
        return [r.values[key] for r in self.records.values() if r.kind == kind and key in r.values]


class PipelineFailed(RuntimeError):
    def __init__(self, result: PipelineResult):
        self.result = result
        stage, error = next(iter(result.errors.items()))
        super().__init__(f"stage {stage!r} failed: {error}")


def connect_ray(spec: PipelineSpec) -> bool:
    """Start or attach to Ray. Returns True when this call started a local instance (which ends with the driver).

    RAY_ADDRESS (set by Ray for a job's driver) wins over the file's `cluster.address`."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or spec.cluster.address
    with keep_signal_handlers():
        if address == "local":
            # The dashboard also serves the State API, which Ray Train's placement-group cleaner polls.
            context = ray.init(address="local", num_cpus=spec.cluster.num_cpus, num_gpus=spec.cluster.num_gpus,
                               include_dashboard=True, dashboard_host="127.0.0.1")
            if context.dashboard_url:
                print(f"[raydiff] Ray dashboard http://{context.dashboard_url}", flush=True)
            return True
        ray.init(address=address)
    return False


@contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """ray.init replaces the SIGTERM handler (with one that exits, and a native one that prints a stack dump first);
    put back whatever this process had, so the driver decides how it stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


StageEvents = Callable[[str, str, str, "dict | None"], None]  # (stage, status, detail, its record's values)


class Runner:
    """`log` receives the pipeline's lines; `on_stage`, when given, receives each stage event instead of its line."""

    def __init__(self, spec: PipelineSpec, no_cache: bool = False, log: Callable[[str], None] = print,
                 on_stage: StageEvents | None = None):
        self.spec, self.no_cache, self.log, self.on_stage = spec, no_cache, log, on_stage
        self.tracking_uri = resolve_tracking_uri(spec.tracking.uri)
        self.storage = Storage(spec.storage.root)
        self.client = MlflowClient(self.tracking_uri)
        self.order = stage_order(spec)
        self.roles = {name: resolve_inputs(spec.stages, name) for name in self.order}
        self.kinds = {name: load_kind(spec.stages[name].kind) for name in self.order}
        self.started_ray = False  # True once this runner started a local Ray instance (it ends with the process)

    def _ray(self) -> None:
        """Connect on first use, so a run whose stages are all cached never waits for Ray to start."""
        if not ray.is_initialized():
            self.started_ray = connect_ray(self.spec)

    def say(self, stage: str, status: str, detail: str = "", values: dict | None = None) -> None:
        if self.on_stage is not None:
            self.on_stage(stage, status, detail, values)
        else:
            self.log(stage_line(stage, status, detail))

    def run(self) -> PipelineResult:
        start = time.perf_counter()
        experiment_id = ensure_experiment(self.tracking_uri, self.spec.tracking.experiment)
        for stale in runs.close_stale_runs(self.client, experiment_id, self.spec.name):
            self.log(f"[raydiff] closed run {stale} of a driver that is gone (status KILLED)")
        parent = runs.start_parent_run(self.client, experiment_id, self.spec, self.no_cache)
        result = PipelineResult(self.spec.name, parent, experiment_id, self.tracking_uri,
                                runs.mlflow_url(self.tracking_uri, experiment_id, parent), self.storage.root)
        self.log(f"[raydiff] pipeline {self.spec.name!r}: {len(self.order)} stages, MLflow run {parent} "
                 f"({self.tracking_uri}), outputs under {self.storage.root}")
        try:
            self._execute(result, experiment_id)
        except BaseException:
            runs.kill_run(self.client, experiment_id, parent)
            raise
        result.seconds = time.perf_counter() - start
        runs.log_metrics(self.client, parent, {"pipeline_seconds": result.seconds,
                                               "stages_cached": sum(s == "cached" for s in result.status.values()),
                                               "stages_run": sum(s == "done" for s in result.status.values())})
        for kind, key, tag in (("deploy", "url", "raydiff.endpoint"), ("evaluate", "samples_dir", "raydiff.samples")):
            values = result.values_of_kind(kind, key)
            if values:
                self.client.set_tag(parent, tag, values[0])
        self.client.set_terminated(parent, status="FINISHED" if result.ok else "FAILED")
        if not result.ok:
            raise PipelineFailed(result)
        return result

    # ---- scheduling ---------------------------------------------------------------------------------------------

    def _execute(self, result: PipelineResult, experiment_id: str) -> None:
        pending = list(self.order)
        running: dict[ray.ObjectRef, dict] = {}
        last_beat = time.perf_counter()
        try:
            while pending or running:
                if not result.errors:
                    self._launch_ready(pending, running, result, experiment_id)
                elif pending:
                    for name in pending:
                        result.status[name] = "skipped"
                        self.say(name, "skipped", "an upstream stage failed")
                    pending.clear()
                if not running:
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
                if not ready:
                    if time.perf_counter() - last_beat >= HEARTBEAT_S:
                        last_beat = time.perf_counter()
                        for job in running.values():
                            self.say(job["name"], "running", f"{time.perf_counter() - job['start']:.0f}s")
                    continue
                job = running.pop(ready[0])
                self._finish(job, ready[0], running, result)
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            if running:  # the tasks are gone before their runs are marked, so none can still mark its own
                ray.wait(list(running), num_returns=len(running), timeout=30.0)
            for job in running.values():
                if job["run_id"]:
                    self.client.set_terminated(job["run_id"], status="KILLED")
            raise

    def _launch_ready(self, pending: list[str], running: dict, result: PipelineResult, experiment_id: str) -> None:
        """Launch every stage whose needs are done; cache hits complete at once, so repeat until nothing changes."""
        progressed = True
        while progressed:
            progressed = False
            for name in list(pending):
                if all(result.status.get(u) in ("done", "cached") for u in self.spec.stages[name].needs):
                    pending.remove(name)
                    self._launch(name, running, result, experiment_id)
                    progressed = True

    def _inputs(self, name: str, result: PipelineResult) -> tuple[dict[str, dict], dict[str, str]]:
        """(role → upstream record JSON, upstream stage → content hash) for the stage's roles and direct needs."""
        inputs = {role: result.records[up].to_json() for role, up in self.roles[name].items()}
        upstream = set(self.roles[name].values()) | set(self.spec.stages[name].needs)
        return inputs, {up: result.records[up].content_hash for up in sorted(upstream)}

    def _launch(self, name: str, running: dict, result: PipelineResult, experiment_id: str) -> None:
        stage, kind = self.spec.stages[name], self.kinds[name]
        inputs, hashes = self._inputs(name, result)
        key = stage_key(kind, stage.params_json(), hashes)
        output_uri = self.storage.uri("stages", stage_dir_name(kind, key))
        info = TaskInfo(stage=name, kind_ref=stage.kind, key=key, output_uri=output_uri,
                        tracking_uri=self.tracking_uri, experiment=self.spec.tracking.experiment, run_id=None,
                        parent_run_id=result.run_id, storage_root=self.storage.root)
        record = None if self.no_cache else read_record(self.storage, output_uri)
        if record is not None:
            self._cached(name, info, inputs, record, result, experiment_id)
            return
        if self.no_cache:
            self.storage.delete_dir(output_uri)
        run_id = None
        if not kind.owns_run:
            run_id = runs.start_stage_run(self.client, experiment_id, result.run_id, self.spec, name, key, False)
        info = TaskInfo(**{**info.__dict__, "run_id": run_id})
        job = {"name": name, "info": info, "inputs": inputs, "attempt": 1, "run_id": run_id}
        self._submit(job, running)

    def _submit(self, job: dict, running: dict) -> None:
        stage = self.spec.stages[job["name"]]
        res = stage.resources
        options = {"num_cpus": res.num_cpus or 0, "num_gpus": res.num_gpus or 0,
                   "name": f"raydiff:{self.spec.name}:{job['name']}"}
        self._ray()
        ref = run_stage_task.options(**options).remote(job["info"], stage.params_json(), job["inputs"])
        job["start"] = time.perf_counter()
        running[ref] = job
        attempts = f", attempt {job['attempt']}/{stage.retries + 1}" if stage.retries else ""
        self.say(job["name"], "started", f"key {job['info'].key[:12]}{attempts}")

    def _cached(self, name: str, info: TaskInfo, inputs: dict, record: StageRecord, result: PipelineResult,
                experiment_id: str) -> None:
        kind = self.kinds[name]
        if kind.restore is not None:
            self._ray()
            stage = self.spec.stages[name]
            ref = restore_stage_task.options(num_cpus=stage.resources.num_cpus or 0,
                                             num_gpus=stage.resources.num_gpus or 0).remote(
                info, stage.params_json(), inputs, record.to_json())
            try:
                record = StageRecord.from_json(ray.get(ref))
            except Exception as error:  # noqa: BLE001 — reported like a failed stage
                message = _stage_error(error)
                self.say(name, "failed", f"restoring the cached output: {message}")
                result.status[name], result.errors[name] = "failed", message
                return
        run_id = runs.start_stage_run(self.client, experiment_id, result.run_id, self.spec, name, info.key, True,
                                      {"raydiff.source_run_id": record.run_id or ""})
        runs.log_metrics(self.client, run_id, record.metrics)
        self.client.set_tag(run_id, "raydiff.output_uri", record.uri)
        self.client.set_terminated(run_id, status="FINISHED")
        result.records[name], result.status[name] = record, "cached"
        self.say(name, "cached", f"key {info.key[:12]} -> {record.uri}", record.values)

    def _finish(self, job: dict, ref: ray.ObjectRef, running: dict, result: PipelineResult) -> None:
        name, stage = job["name"], self.spec.stages[job["name"]]
        seconds = time.perf_counter() - job["start"]
        try:
            record = StageRecord.from_json(ray.get(ref))
        except Exception as error:  # noqa: BLE001 — the stage's own error, reported and retried
            message = _stage_error(error)
            if job["run_id"]:
                self.client.log_text(job["run_id"], traceback_text(error), f"errors/attempt{job['attempt']}.txt")
            if job["attempt"] <= stage.retries:
                self.say(name, "retrying", f"attempt {job['attempt']} failed after {seconds:.1f}s: {message}")
                job["attempt"] += 1
                self._submit(job, running)
                return
            self.say(name, "failed", f"after {seconds:.1f}s: {message}")
            if job["run_id"]:
                self.client.set_tag(job["run_id"], "raydiff.error", message[:5000])
                self.client.set_terminated(job["run_id"], status="FAILED")
            result.status[name], result.errors[name] = "failed", message
            return
        run_id, owns_run = record.run_id, self.kinds[name].owns_run
        if run_id:
            if owns_run:  # the stage logged its own metrics
                runs.tag_stage_run(self.client, run_id, self.spec, name, job["info"].key, False)
            stage_metrics = {"stage_seconds": seconds, "attempts": job["attempt"]}
            runs.log_metrics(self.client, run_id, stage_metrics if owns_run else {**record.metrics, **stage_metrics})
            self.client.set_tag(run_id, "raydiff.output_uri", record.uri)
            if not owns_run:
                self.client.set_terminated(run_id, status="FINISHED")
        result.records[name], result.status[name] = record, "done"
        self.say(name, "done", f"{seconds:.1f}s -> {record.uri}", record.values)


def _stage_error(error: BaseException) -> str:
    """The stage's own exception (Ray wraps it) as one line."""
    cause = getattr(error, "cause", None) or error
    text = " | ".join(line.strip() for line in f"{type(cause).__name__}: {cause}".splitlines() if line.strip())
    return text[:2000]


def traceback_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def run_pipeline(spec: PipelineSpec, no_cache: bool = False, log: Callable[[str], None] = print) -> PipelineResult:
    """Run the pipeline on the current Ray (connecting or starting one per `spec.cluster` when a stage must run)."""
    return Runner(spec, no_cache=no_cache, log=log).run()
