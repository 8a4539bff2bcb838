"""The Ray tasks the runner submits: run one stage (or restore a cached one) and return its record as JSON."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import ray

from pipelines.cache import write_record
from pipelines.hashing import hash_json
from pipelines.kinds import load_kind
from pipelines.stage import StageContext, StageRecord
from pipelines.storage import Storage


@dataclass(frozen=True)
class TaskInfo:
    """What a stage task needs besides its parameters and inputs."""

    stage: str
    kind_ref: str
    key: str
    output_uri: str
    tracking_uri: str
    experiment: str
    run_id: str | None
    parent_run_id: str
    storage_root: str


def _context(info: TaskInfo, params_json: dict, inputs: dict[str, dict]) -> StageContext:
    kind = load_kind(info.kind_ref)
    storage = Storage(info.storage_root)
    work_dir = storage.work_dir(info.output_uri)
    work_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(stage=info.stage, params=kind.params_model().model_validate(params_json),
                        inputs={role: StageRecord.from_json(r) for role, r in inputs.items()}, output_dir=work_dir,
                        output_uri=info.output_uri, tracking_uri=info.tracking_uri, experiment=info.experiment,
                        run_id=info.run_id, parent_run_id=info.parent_run_id, storage_root=info.storage_root)


@ray.remote(max_retries=0)
def run_stage_task(info: TaskInfo, params_json: dict, inputs: dict[str, dict]) -> dict:
    """Run the stage, publish its outputs, write its record (which completes the cache entry) and return it."""
    start = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download floods the log
    kind = load_kind(info.kind_ref)
    ctx = _context(info, params_json, inputs)
    result = kind.run(ctx)
    Storage(info.storage_root).publish(ctx.output_dir, info.output_uri)
    record = StageRecord(stage=info.stage, kind=kind.name, key=info.key, uri=info.output_uri, values=result.values,
                         content_hash=result.content_hash or hash_json(result.values),
                         run_id=result.run_id or info.run_id, seconds=round(time.perf_counter() - start, 3),
                         finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         metrics={k: float(v) for k, v in result.metrics.items()})
    write_record(Storage(info.storage_root), record)
    return record.to_json()


@ray.remote(max_retries=0)
def restore_stage_task(info: TaskInfo, params_json: dict, inputs: dict[str, dict], record_json: dict) -> dict:
    """Re-establish a cached stage's live side effect (e.g. a deployment on a fresh cluster)."""
    kind = load_kind(info.kind_ref)
    ctx = _context(info, params_json, inputs)
    record = kind.restore(ctx, StageRecord.from_json(record_json))
    return record.to_json()
