"""The DAG runner with real Ray tasks and a real MLflow store, on small stand-in stage kinds defined here.

Each stand-in appends a line to `log` when it executes, so tests see exactly which stages ran.
"""

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict

from pipelines.runner.execute import PipelineFailed, run_pipeline
from pipelines.spec import build_spec
from pipelines.stage import StageContext, StageKind, StageResult

HERE = "tests.pipelines.test_dag_runner"
MEET_TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def _spec_tracking_uri_wins(monkeypatch):
    """MLFLOW_TRACKING_URI overrides the pipeline file; another test's mlflow.set_tracking_uri may have set it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


class NumberParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int = 0
    note: str = ""  # changes the key, not the output
    sleep: float = 0.0
    meet: list[str] = []  # stages this one waits for (up to MEET_TIMEOUT_S) before it finishes: proves overlap
    fail_times: int = 0  # fail this many attempts first (-1: always)
    log: str


def _execute(ctx: StageContext, total: int) -> StageResult:
    p = ctx.params
    attempts_file = ctx.output_dir / "attempts"
    attempt = len(attempts_file.read_text().splitlines()) + 1 if attempts_file.exists() else 1
    attempts_file.write_text("x\n" * attempt)
    start = time.time()
    time.sleep(p.sleep)
    met = meet(Path(p.log).parent, ctx.stage, p.meet)
    with open(p.log, "a") as handle:
        handle.write(json.dumps({"stage": ctx.stage, "start": start, "end": time.time(), "attempt": attempt,
                                 "met": met}) + "\n")
    if p.fail_times < 0 or attempt <= p.fail_times:
        raise RuntimeError(f"{ctx.stage} failed on purpose (attempt {attempt})")
    (ctx.output_dir / "total.txt").write_text(str(total))
    ctx.mlflow().log_artifact(ctx.run_id, str(ctx.output_dir / "total.txt"))
    return StageResult(values={"total": total, "dir": ctx.output_uri}, metrics={"total": total},
                       content_hash=str(total))


def meet(folder: Path, stage: str, others: list[str]) -> bool:
    """Mark `stage` as arrived, then wait until every stage in `others` has arrived too. True when they all did
    within MEET_TIMEOUT_S: only stages that run at the same time can meet, however slowly workers start."""
    (folder / f"arrived-{stage}").touch()
    deadline = time.monotonic() + MEET_TIMEOUT_S
    while not all((folder / f"arrived-{other}").exists() for other in others):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_source(ctx: StageContext) -> StageResult:
    return _execute(ctx, ctx.params.value)


def run_sum(ctx: StageContext) -> StageResult:
    """value + the totals of every direct upstream stage (read from their output files, not passed in memory)."""
    upstream = sum(int((ctx.localize(r.values["dir"]) / "total.txt").read_text()) for r in ctx.inputs.values())
    return _execute(ctx, ctx.params.value + upstream)


SOURCE = StageKind(name="source", params=f"{HERE}:NumberParams", run=run_source)
SUM = StageKind(name="sum", params=f"{HERE}:NumberParams", run=run_sum, inputs={"first": ("source", "sum")})
SUM2 = StageKind(name="sum2", params=f"{HERE}:NumberParams", run=run_sum,
                 inputs={"left": ("sum",), "right": ("sum2src",)})
SUM2SRC = StageKind(name="sum2src", params=f"{HERE}:NumberParams", run=run_sum, inputs={"first": ("source",)})


def diamond(tmp_path: Path, mlflow_uri: str, sets=(), **overrides) -> "PipelineSpec":  # noqa: F821
    """a → b, a → c, (b, c) → d; b and c wait for each other, which only stages running in parallel can do."""
    log = str(tmp_path / "log.jsonl")
    raw = {
        "name": "diamond",
        "tracking": {"uri": mlflow_uri, "experiment": "dag-test"},
        "storage": {"root": str(tmp_path / "store")},
        "stages": {
            "a": {"kind": f"{HERE}:SOURCE", "value": 1, "log": log},
            "b": {"kind": f"{HERE}:SUM", "needs": ["a"], "value": 10, "meet": ["c"], "log": log},
            "c": {"kind": f"{HERE}:SUM2SRC", "needs": ["a"], "value": 100, "meet": ["b"], "log": log},
            "d": {"kind": f"{HERE}:SUM2", "needs": ["b", "c"], "value": 1000, "log": log},
        },
    }
    for stage, params in overrides.items():
        raw["stages"][stage].update(params)
    return build_spec(raw, list(sets))


def executions(tmp_path: Path) -> list[dict]:
    path = tmp_path / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return [json.loads(line) for line in lines]


def stage_runs(mlflow_uri: str, parent_run_id: str) -> dict[str, object]:
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.data.tags["raydiff.stage"]: run for run in children}


def test_diamond_runs_in_parallel_then_caches_then_reruns_only_what_changed(ray_session, tmp_path, mlflow_uri):
    lines = []
    result = run_pipeline(diamond(tmp_path, mlflow_uri), log=lines.append)
    assert result.ok and result.status == dict.fromkeys("abcd", "done")
    assert result.records["d"].values["total"] == 1000 + (10 + 1) + (100 + 1)
    ran = {e["stage"]: e for e in executions(tmp_path)}
    assert set(ran) == set("abcd")
    assert ran["b"]["met"] and ran["c"]["met"], "b and c did not run at the same time"
    assert ran["d"]["start"] >= max(ran["b"]["end"], ran["c"]["end"])

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "pipeline")}
    assert artifacts == {"pipeline/resolved.yaml", "pipeline/dag.mmd"}
    runs = stage_runs(mlflow_uri, result.run_id)
    assert set(runs) == set("abcd")
    assert all(r.data.tags["raydiff.cache_hit"] == "false" and r.info.status == "FINISHED" for r in runs.values())
    assert runs["d"].data.metrics["total"] == 1112 and runs["b"].data.params["value"] == "10"
    assert [a.path for a in client.list_artifacts(runs["d"].info.run_id)] == ["total.txt"]

    lines.clear()
    again = run_pipeline(diamond(tmp_path, mlflow_uri), log=lines.append)
    assert again.status == dict.fromkeys("abcd", "cached") and executions(tmp_path) == []
    assert sum("cached" in line for line in lines) == 4
    cached_runs = stage_runs(mlflow_uri, again.run_id)
    assert all(r.data.tags["raydiff.cache_hit"] == "true" for r in cached_runs.values())
    assert cached_runs["d"].data.metrics["total"] == 1112
    assert cached_runs["d"].data.tags["raydiff.source_run_id"] == runs["d"].info.run_id

    changed = run_pipeline(diamond(tmp_path, mlflow_uri, sets=["b.value=20"]), log=lines.append)
    assert changed.status == {"a": "cached", "b": "done", "c": "cached", "d": "done"}
    assert sorted(e["stage"] for e in executions(tmp_path)) == ["b", "d"]
    assert changed.records["d"].values["total"] == 1000 + 21 + 101

    forced = run_pipeline(diamond(tmp_path, mlflow_uri, sets=["b.value=20"]), no_cache=True, log=lines.append)
    assert set(forced.status.values()) == {"done"} and len(executions(tmp_path)) == 4


def test_same_content_from_a_rerun_upstream_keeps_downstream_cached(ray_session, tmp_path, mlflow_uri):
    run_pipeline(diamond(tmp_path, mlflow_uri), log=lambda _: None)
    executions(tmp_path)
    result = run_pipeline(diamond(tmp_path, mlflow_uri, sets=["a.note=cosmetic"]), log=lambda _: None)
    assert result.status == {"a": "done", "b": "cached", "c": "cached", "d": "cached"}


def test_retry_then_success(ray_session, tmp_path, mlflow_uri):
    spec = diamond(tmp_path, mlflow_uri, sets=["b.fail_times=1", "b.sleep=0", "c.sleep=0"], b={"retries": 1})
    lines = []
    result = run_pipeline(spec, log=lines.append)
    assert result.ok
    assert [e["attempt"] for e in executions(tmp_path) if e["stage"] == "b"] == [1, 2]
    assert any("retrying" in line and "failed on purpose" in line for line in lines)
    run = stage_runs(mlflow_uri, result.run_id)["b"]
    assert run.data.metrics["attempts"] == 2 and run.info.status == "FINISHED"


def test_failure_fails_the_run_and_keeps_finished_outputs(ray_session, tmp_path, mlflow_uri):
    spec = diamond(tmp_path, mlflow_uri, sets=["b.fail_times=-1", "b.sleep=0", "c.sleep=0.5"], b={"retries": 1})
    with pytest.raises(PipelineFailed, match="b failed on purpose") as failure:
        run_pipeline(spec, log=lambda _: None)
    result = failure.value.result
    assert result.status == {"a": "done", "b": "failed", "c": "done", "d": "skipped"}
    assert len([e for e in executions(tmp_path) if e["stage"] == "b"]) == 2
    client = MlflowClient(mlflow_uri)
    assert client.get_run(result.run_id).info.status == "FAILED"
    runs = stage_runs(mlflow_uri, result.run_id)
    assert runs["b"].info.status == "FAILED" and "failed on purpose" in runs["b"].data.tags["raydiff.error"]
    assert {a.path for a in client.list_artifacts(runs["b"].info.run_id, "errors")} == {
        "errors/attempt1.txt", "errors/attempt2.txt"}

    fixed = run_pipeline(diamond(tmp_path, mlflow_uri, sets=["b.sleep=0", "c.sleep=0.5"]), log=lambda _: None)
    assert fixed.status == {"a": "cached", "b": "done", "c": "cached", "d": "done"}
