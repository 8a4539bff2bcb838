"""MLflow conventions shared by every stage: where the tracking store is and what every run is tagged with."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI wins over the pipeline file; a relative sqlite path becomes absolute (Ray workers have
    other working directories)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


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
