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
