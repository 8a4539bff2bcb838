"""One ddim-50 request of one image: `mlflow models serve` of the registered model (its pyfunc, one worker) against
raydiff's endpoint serving the same version, measured in alternating rounds on loopback HTTP. For the record: MLflow's
server runs one request at a time through `predict`, raydiff's batches requests, so one request alone is where the
two are closest.

    python -m benchmarks.mlflow_serve [--preset small] [--requests 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from benchmarks.report import Row, emit
from benchmarks.serve_load import free_port, register_model

STEPS = 50


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def mlflow_server(model_uri: str, tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` of `model_uri` on a loopback port, with this interpreter's environment."""
    port, bin_dir = free_port(), Path(sys.executable).parent
    process = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                               env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                                    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/ping", process)
    return process, url


def latency(post) -> float:
    start = time.perf_counter()
    response = post()
    response.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=10, help="requests per server (alternating)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from services.deploy import deploy

    tmp = Path(tempfile.mkdtemp(prefix="mlflow-serve-"))
    model_uri, tracking_uri = register_model(tmp, args.preset)
    process, mlflow_url = mlflow_server(model_uri, tracking_uri, tmp / "mlflow-serve.log")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=max(4, os.cpu_count() or 1))
    try:
        raydiff_url = deploy(model_uri, tracking_uri, port=free_port(), name="mlflow-serve-bench")
        ours = lambda: requests.post(f"{raydiff_url.rstrip('/')}/v1/samples", json={  # noqa: E731
            "sampler": "ddim", "steps": STEPS, "num_images": 1, "seed": 0}, timeout=300)
        theirs = lambda: requests.post(f"{mlflow_url}/invocations", json={  # noqa: E731
            "dataframe_split": {"columns": ["num_samples"], "data": [[1]]},
            "params": {"sampler": "ddim", "steps": STEPS, "seed": 0}}, timeout=300)
        latency(ours), latency(theirs)  # warm-up
        times = {"ours": [], "theirs": []}
        for _ in range(args.requests):
            times["ours"].append(latency(ours))
            times["theirs"].append(latency(theirs))
    finally:
        serve.shutdown()
        ray.shutdown()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    p50 = {side: statistics.median(values) * 1e3 for side, values in times.items()}
    emit([Row(f"one ddim-{STEPS} request, 1 image, p50 latency ({args.preset} preset)", p50["ours"], p50["theirs"],
              "ms", "for the record (baseline: mlflow models serve)", lower_is_better=True)],
         args.json, "raydiff endpoint vs mlflow models serve")


if __name__ == "__main__":
    main()
