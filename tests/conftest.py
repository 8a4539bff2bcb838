"""Shared fixtures: one real local Ray instance for the whole test session, real MLflow stores in tmp dirs."""

import os
import socket

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _registry_uri_left_as_found():
    """mlflow.set_registry_uri sets MLFLOW_REGISTRY_URI and never unsets it; a test that sets it must not send
    every later MlflowClient of this process to its store."""
    before = os.environ.get("MLFLOW_REGISTRY_URI")
    yield
    if os.environ.get("MLFLOW_REGISTRY_URI") != before:
        from mlflow.tracking._model_registry import utils as registry

        registry._registry_uri = before
        if before is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
        else:
            os.environ["MLFLOW_REGISTRY_URI"] = before


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP API on 127.0.0.1 (moto's server process). Yields (endpoint "HOST:PORT", credentials env);
    `tests.s3server.s3_bucket(endpoint, name)` creates a bucket."""
    from tests.s3server import CREDENTIALS, moto_server

    with moto_server() as endpoint:
        yield endpoint, dict(CREDENTIALS)
