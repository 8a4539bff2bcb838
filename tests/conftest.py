"""Shared fixtures: one real local Ray instance for the whole test session, real MLflow stores in tmp dirs."""

import os
import socket

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray started once per test session (startup costs ~5 s).

    `address="local"` always starts a fresh cluster, never attaching to one a test started with `ray start`.
    8 logical CPUs on a 2-core machine let two train workers, Ray Data and a Serve replica coexist.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ctx = ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ctx
    ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path) -> str:
    """A fresh sqlite-backed MLflow tracking store; artifacts go beside it."""
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP API on 127.0.0.1: moto's server process. Yields (endpoint host:port, credentials env).

    `s3_bucket(endpoint, name)` creates a bucket; URIs name the endpoint in their query
    (s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http&region=us-east-1) or through AWS_ENDPOINT_URL."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    port = free_port()
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"moto_server did not start on port {port} (exit code {process.poll()})")
        time.sleep(0.2)
    yield f"127.0.0.1:{port}", dict(S3_CREDENTIALS)
    process.terminate()
    process.wait(timeout=10)


def s3_bucket(endpoint: str, name: str) -> str:
    """Create bucket `name` on the S3 endpoint; returns the URI of its root with the endpoint in the query."""
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True,
                      access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_dir(name)
    return f"s3://{name}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
