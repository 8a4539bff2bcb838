"""What a stage kind is (its parameters, inputs, code and function) and what its function receives and returns.

Each kind defines its `KIND` in `pipelines/<kind>/stage.py`; `pipelines.kinds` maps the built-in names to them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class StageKind:
    """One kind of stage.

    params       "module:Class" of its pydantic parameter model (imported lazily: kinds that are not used are never
                 imported, so a pipeline of ingest alone needs no torch model code)
    inputs       role → the kinds that can fill it; the runner fills each role from the nearest upstream stage of
                 one of those kinds (direct needs first, then their ancestors)
    version      what the kind's outputs mean for given parameters and inputs (part of its cache key): bump it when a
                 change to the kind's code (or to the library it calls) makes the same inputs give different outputs
    run          the function executed in the stage's Ray task: run(ctx) -> StageResult
    resources    defaults for the stage task's `resources:`
    owns_run     True when `run` creates its own MLflow run (nested under ctx.parent_run_id) and returns its id
    restore      called (in a Ray task) on a cache hit, for stages whose output is a live side effect (a deployment)
    """

    name: str
    params: str
    run: Callable[["StageContext"], "StageResult"]
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    version: str = "1"
    resources: dict[str, float] = field(default_factory=dict)
    owns_run: bool = False
    restore: Callable[["StageContext", "StageRecord"], "StageRecord"] | None = None

    def params_model(self) -> type[BaseModel]:
        module, _, attr = self.params.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass
class StageResult:
    """What a stage function returns.

    values        small JSON-ready outputs downstream stages read (artifact URIs, model URIs, scalars)
    metrics       logged to the stage's MLflow run by the runner
    content_hash  hash of the output's content (defaults to a hash of `values`); downstream cache keys use it
    run_id        the MLflow run the stage created itself (kinds with owns_run)
    """

    values: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    content_hash: str | None = None
    run_id: str | None = None


@dataclass
class StageRecord:
    """A finished stage's output, stored as JSON beside its artifacts; its presence marks a cache entry complete."""

    stage: str
    kind: str
    key: str
    uri: str  # the stage's output directory (local path or pyarrow.fs URI)
    values: dict[str, Any]
    content_hash: str
    run_id: str | None
    seconds: float
    finished_at: str
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> "StageRecord":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class StageContext:
    """Everything a stage function gets: its parameters, its inputs' records, a local output dir and MLflow."""

    stage: str
    params: BaseModel
    inputs: dict[str, StageRecord]
    output_dir: Path
    output_uri: str
    tracking_uri: str
    experiment: str
    run_id: str | None  # the stage's nested MLflow run (None for kinds with owns_run)
    parent_run_id: str
    storage_root: str

    def localize(self, uri: str) -> Path:
        """A local directory holding the artifact at `uri` (downloaded into a local cache if it is remote)."""
        from pipelines.storage import Storage

        return Storage(self.storage_root).localize(uri)

    def uri_of(self, path: Path) -> str:
        """The URI that `path` (inside output_dir) will have once the stage's outputs are published."""
        from pipelines.storage import join_uri

        return join_uri(self.output_uri, *Path(path).resolve().relative_to(self.output_dir.resolve()).parts)

    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        client = self.mlflow()
        for path in paths:
            if Path(path).is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                client.log_artifact(self.run_id, str(path), artifact_path)
