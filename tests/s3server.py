"""A real S3 HTTP API on loopback for tests and benchmarks: moto's server process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """Start `moto_server` on a free loopback port; yields its endpoint "127.0.0.1:PORT"."""
    port = _free_port()
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port} (exit code {process.poll()})")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def s3_bucket(endpoint: str, name: str) -> str:
    """Create bucket `name` on the S3 endpoint; returns the URI of its root with the endpoint in the query
    (s3://NAME?endpoint_override=HOST:PORT&scheme=http&region=us-east-1)."""
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True,
                      access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_dir(name)
    return f"s3://{name}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
