"""MLflow bookkeeping of a pipeline run: one parent run, one nested run per stage, stale runs closed."""

from __future__ import annotations

import json
import os
import socket

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipelines.dag_render import render_mermaid
from pipelines.spec import PipelineSpec
from pipelines.tracking import MAX_PARAM_CHARS, flatten, run_tags

PIPELINE_TAG = "raydiff.pipeline"
DRIVER_TAG = "raydiff.driver"  # "<host>:<pid>" of the driver process, to close runs of a killed driver


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_alive(tag: str | None) -> bool:
    host, _, pid = (tag or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's driver: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_stale_runs(client: MlflowClient, experiment_id: str, pipeline: str) -> list[str]:
    """Mark RUNNING parent runs of `pipeline` whose driver (on this host) is gone, and their RUNNING children, KILLED."""
    stale = client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{pipeline}' and attributes.status = 'RUNNING'")
    closed = []
    for run in stale:
        if run.data.tags.get("mlflow.parentRunId") or _driver_alive(run.data.tags.get(DRIVER_TAG)):
            continue
        kill_run(client, experiment_id, run.info.run_id)
        closed.append(run.info.run_id)
    return closed


def kill_run(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    """Mark a pipeline run and its RUNNING stage runs (those the stages opened themselves included) KILLED."""
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                    "and attributes.status = 'RUNNING'")
    for child in children:
        client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status="KILLED")


def start_parent_run(client: MlflowClient, experiment_id: str, spec: PipelineSpec, no_cache: bool) -> str:
    tags = run_tags(**{PIPELINE_TAG: spec.name, DRIVER_TAG: driver_id(), "raydiff.role": "pipeline"})
    run_id = client.create_run(experiment_id, run_name=spec.name, tags=tags).info.run_id
    params = {"pipeline": spec.name, "stages": ",".join(spec.stages), "no_cache": str(no_cache),
              "overrides": json.dumps(list(spec.overrides))[:MAX_PARAM_CHARS]}
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    if spec.source_text:
        client.log_text(run_id, spec.source_text, "pipeline/pipeline.yaml")
    client.log_text(run_id, yaml.safe_dump(spec.resolved(), sort_keys=False), "pipeline/resolved.yaml")
    client.log_text(run_id, render_mermaid(spec) + "\n", "pipeline/dag.mmd")
    return run_id


def start_stage_run(client: MlflowClient, experiment_id: str, parent_run_id: str, spec: PipelineSpec, name: str,
                    key: str, cache_hit: bool, extra_tags: dict[str, str] | None = None) -> str:
    stage = spec.stages[name]
    tags = run_tags(**{"mlflow.parentRunId": parent_run_id, PIPELINE_TAG: spec.name, **(extra_tags or {})})
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    tag_stage_run(client, run_id, spec, name, key, cache_hit)
    client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(stage.params_json()).items()])
    return run_id


def tag_stage_run(client: MlflowClient, run_id: str, spec: PipelineSpec, name: str, key: str, cache_hit: bool) -> None:
    stage = spec.stages[name]
    tags = {"raydiff.stage": name, "raydiff.kind": stage.kind, "raydiff.cache_key": key,
            "raydiff.cache_hit": str(cache_hit).lower(), PIPELINE_TAG: spec.name}
    client.log_batch(run_id, metrics=[Metric("cache_hit", float(cache_hit), _now_ms(), 0)],
                     tags=[RunTag(k, v) for k, v in tags.items()])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    now = _now_ms()
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    for start in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[start:start + 1000])


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def mlflow_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the server itself for http(s) stores, else where `raydiff ui` serves it."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
