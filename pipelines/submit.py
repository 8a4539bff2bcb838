"""`raydiff submit/status/logs`: run a pipeline on a remote Ray cluster through the Ray Jobs API.

The job's working directory is this project (uploaded as the `working_dir` runtime env, without virtualenvs,
git data, local MLflow stores and stage outputs); its entrypoint is `python -m pipelines.cli run PIPELINE
--no-serve-wait`, so the driver runs on the cluster and leaves a deployed Serve application running there.

Authentication: clusters with token auth (Ray's default for local clusters) need `Authorization: Bearer TOKEN`.
The token comes from --token, else RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else (for a
cluster on this machine, or with RAY_AUTH_MODE=token) ~/.ray/auth_token — the same places Ray itself reads.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from pipelines.spec import load_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv/", "venv/", ".git/", "mlruns/", "mlruns.db", "mlartifacts/", ".raydiff/", "__pycache__/",
            ".pytest_cache/", "*.egg-info/", "build/", "dist/", "*.db", "*.tar.gz", "*.whl"]


class PipelineOutsideWorkingDir(ValueError):
    pass


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not urlparse(address).scheme.startswith("http"):
        address = "http://" + address.split("://")[-1]
    return address.rstrip("/")


def find_token(address: str, token: str | None = None) -> str | None:
    if token:
        return token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser().read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    local = urlparse(address).hostname in ("127.0.0.1", "localhost", "::1")
    if default.is_file() and (local or os.environ.get("RAY_AUTH_MODE", "").lower() == "token"):
        return default.read_text().strip()
    return None


def job_local_paths(spec) -> list[str]:
    """Relative local paths in the spec: inside a job they land in its working dir, which Ray deletes afterwards."""
    from pipelines.storage import is_remote
    from pipelines.tracking import DEFAULT_TRACKING_URI

    warnings = []
    uri = os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        warnings.append(f"tracking.uri {uri} is relative to the job's working dir; use an MLflow server "
                        "(or an absolute path on a disk the cluster shares)")
    root = spec.storage.root
    if not is_remote(root) and not Path(root).expanduser().is_absolute():
        warnings.append(f"storage.root {root} is relative to the job's working dir; use s3://… (or an absolute "
                        "path on a disk the cluster shares)")
    return warnings


def job_client(address: str | None, token: str | None = None):
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    secret = find_token(address, token)
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    return JobSubmissionClient(address, headers=headers)


def entrypoint(pipeline: str, overrides: list[str], no_cache: bool) -> str:
    args = ["python", "-m", "pipelines.cli", "run", pipeline, "--no-serve-wait"]
    for item in overrides:
        args += ["--set", item]
    if no_cache:
        args.append("--no-cache")
    return shlex.join(args)


def submit_pipeline(pipeline: str | Path, address: str | None, overrides: list[str], no_cache: bool = False,
                    working_dir: str | Path = ".", env: dict[str, str] | None = None, token: str | None = None,
                    log: TextIO = sys.stdout) -> tuple[object, str]:
    """Validate the pipeline here, then submit it. Returns (client, job id)."""
    spec = load_spec(pipeline, overrides)  # fail before uploading anything
    working_dir = Path(working_dir).resolve()
    try:
        relative = Path(pipeline).resolve().relative_to(working_dir).as_posix()
    except ValueError:
        raise PipelineOutsideWorkingDir(f"{pipeline} is outside the working dir {working_dir}, which is what the job gets; "
                         f"move it inside or pass --working-dir") from None
    for warning in job_local_paths(spec):
        print(f"[raydiff] warning: {warning}", file=log)
    env_vars = {k: v for k, v in os.environ.items() if k == "MLFLOW_TRACKING_URI"}
    env_vars.update(env or {})
    client = job_client(address, token)
    job_id = client.submit_job(
        entrypoint=entrypoint(relative, overrides, no_cache),
        runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars},
        metadata={"raydiff.pipeline": spec.name},
    )
    return client, job_id


def follow_logs(client, job_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value)


def describe_jobs(client, job_id: str | None = None) -> list[str]:
    if job_id:
        info = client.get_job_info(job_id)
        lines = [f"job {job_id}: {info.status.value}", f"  entrypoint: {info.entrypoint}"]
        if info.message:
            lines.append(f"  message: {info.message}")
        return lines
    lines = []
    for info in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        name = (info.metadata or {}).get("raydiff.pipeline", "")
        lines.append(f"{info.submission_id or info.job_id}  {info.status.value:<9}  {name:<16}  {info.entrypoint}")
    return lines or ["no jobs"]
