"""MLflow conventions shared by every stage: where the tracking store is, what every run is tagged with, how nested
configuration becomes params."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
MAX_PARAM_CHARS = 6000


def absolute_sqlite(uri: str) -> str:
    """A relative sqlite path made absolute (Ray workers and Serve replicas have other working directories)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI wins over the pipeline file; a relative sqlite path becomes absolute."""
    return absolute_sqlite(os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI)


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"}: nested configuration as MLflow params (values cut to MAX_PARAM_CHARS)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (register_model, pytorch.load_model) reads a process-global URI, and setting it also sets
    MLFLOW_TRACKING_URI in os.environ; restore both afterwards so no later code in this process inherits it."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_tags(**extra: str) -> dict[str, str]:
    """Tags for every run: code version and library versions."""
    import mlflow
    import ray
    import torch

    return {
        "git_commit": git_commit(Path(__file__).parent),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        **{k: str(v) for k, v in extra.items()},
    }


def artifact_root_for(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (`<db dir>/mlartifacts`) as an absolute path, so Ray
    workers with other working directories write to the same place. Other stores keep their server's default."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).parent / "mlartifacts").resolve().as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created (with `artifact_root_for`) when missing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri))
