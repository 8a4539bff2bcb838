"""A real two-node Ray cluster on one machine: a head and a second node started as separate `ray start` processes
(token auth on), the ingest → train pipeline submitted with `raydiff submit`, and 2 training workers that can only
fit one per node (1 CPU per node, 1 CPU per worker, STRICT_SPREAD). The train run's MLflow tags name both nodes.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.pipelines.test_submit import BIN, ROOT, raydiff

pytestmark = pytest.mark.slow

PIPELINE = """
name: multinode
tracking: {{uri: "sqlite:///{db}", experiment: multinode}}
storage: {{root: "{store}"}}
stages:
  ingest:
    source: {{kind: sklearn_digits}}
    image: {{size: 8, channels: 1}}
  train:
    needs: [ingest]
    model: {{preset: tiny}}
    schedule: {{num_timesteps: 100}}
    steps: 20
    batch_size: 32
    workers: 2
    cpus_per_worker: 1
    placement_strategy: STRICT_SPREAD
    warmup_steps: 10
    log_every: 10
    checkpoint_every: 20
    eval_every: 0
    eval_batches: 1
    eval_batch_size: 16
    sample_grid: 4
    sample_ddpm_steps: 2
    sample_ddim_steps: 2
"""


def node_ports(head: bool) -> list[str]:
    """Free ports for every listener of one node (two nodes on one machine must not share any)."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    if head:
        names += ["--ray-client-server-port"]
    return [str(part) for name in names for part in (name, free_port())]


def alive_nodes(address: str, token: str) -> list[str]:
    """Node ids of the cluster's ALIVE nodes, from the dashboard's state API."""
    reply = requests.get(f"{address}/api/v0/nodes", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    reply.raise_for_status()
    return sorted(n["node_id"] for n in reply.json()["data"]["result"]["result"] if n["state"] == "ALIVE")


def wait_for_nodes(count: int, address: str, token: str, processes: list[subprocess.Popen], log_dir: Path,
                   timeout: float = 120) -> list[str]:
    """Poll the dashboard until the cluster has `count` ALIVE nodes; returns their ids."""
    deadline = time.time() + timeout
    while True:
        try:
            nodes = alive_nodes(address, token)
            if len(nodes) == count:
                return nodes
        except requests.RequestException:
            pass  # the dashboard is not up yet
        if any(p.poll() is not None for p in processes) or time.time() > deadline:
            raise RuntimeError(f"the cluster did not reach {count} alive nodes; see the logs in {log_dir}")
        time.sleep(1)


def stop(processes: list[subprocess.Popen], temp_dirs: list[Path]) -> None:
    """SIGTERM each `ray start` process group, then kill whatever of theirs is left."""
    started = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            started += psutil.Process(process.pid).children(recursive=True)
    for process in reversed(processes):  # the second node first: a head that goes first leaves it waiting on GCS
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    leftovers = started + [p for p in psutil.process_iter(["cmdline"])
                           if any(str(d) in " ".join(p.info["cmdline"] or []) for d in temp_dirs)]
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture()
def two_nodes(tmp_path):
    """A head (1 CPU, dashboard) and a second node (1 CPU) joined to it, both `ray start --block` processes with
    their own ports and temp dirs, as on two machines."""
    token = secrets.token_hex(16)
    tag = secrets.token_hex(3)
    temp_dirs = [Path("/tmp") / f"rd-{tag}-{n}" for n in ("h", "w")]  # short: socket paths must fit in 107 bytes
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    head_args = ["--head", "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dashboard), *node_ports(head=True)]
    worker_args = ["--address", f"127.0.0.1:{gcs}", *node_ports(head=False)]
    log_dir = tmp_path / "ray-logs"
    log_dir.mkdir()
    address = f"http://127.0.0.1:{dashboard}"
    processes: list[subprocess.Popen] = []

    def start(args: list[str], temp_dir: Path) -> None:
        command = [str(BIN / "ray"), "start", *args, "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                   "--temp-dir", str(temp_dir)]
        with open(log_dir / f"{temp_dir.name}.log", "w") as log:
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))

    try:
        start(head_args, temp_dirs[0])
        wait_for_nodes(1, address, token, processes, log_dir)
        start(worker_args, temp_dirs[1])
        nodes = wait_for_nodes(2, address, token, processes, log_dir)
        yield {"address": address, "token": token, "nodes": nodes}
    finally:
        stop(processes, temp_dirs)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_submitted_training_spreads_two_workers_over_two_nodes(two_nodes, tmp_path):
    project = tmp_path / "project"
    for package in ("diffusion", "pipelines", "services"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    db = tmp_path / "mlruns.db"
    (project / "pipeline.yaml").write_text(PIPELINE.format(db=db, store=tmp_path / "store"))

    out = raydiff("submit", "pipeline.yaml", "--address", two_nodes["address"], token=two_nodes["token"],
                  cwd=project, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[raydiff] train      done" in out.stdout and " SUCCEEDED" in out.stdout, out.stdout

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("multinode")
    [train] = client.search_runs([experiment.experiment_id], "tags.`raydiff.stage` = 'train'")
    assert train.info.status == "FINISHED"
    worker_nodes = json.loads(train.data.tags["raydiff.worker_nodes"])
    assert len(worker_nodes) == 2 and train.data.tags["raydiff.num_nodes"] == "2", train.data.tags
    assert sorted(worker_nodes) == two_nodes["nodes"]  # one rank on each node of this cluster
    assert len(json.loads(train.data.tags["raydiff.worker_hosts"])) == 2
    assert train.data.params["train.placement_strategy"] == "STRICT_SPREAD"
