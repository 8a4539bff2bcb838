"""A cluster whose nodes share nothing but the network: a Ray head and two worker nodes on this machine, each worker
node's `ray start` in its own mount namespace (`unshare -m`, a private tmpfs over /tmp, its own RAYDIFF_CACHE_DIR),
so a path written on one node does not exist on another. Storage is a real S3 API on loopback (moto's server);
tracking is a real `mlflow server` with proxied artifacts (stored in the same S3). Pipelines go in with
`raydiff submit`; the training workers are placed one per worker node (a `trainer` resource, STRICT_SPREAD).

1. The whole pipeline (ingest → train → evaluate → register → deploy) finishes; the endpoint answers; MLflow holds
   every stage's run; the model lies in the tracking server's artifact store; each worker node localized the
   training split itself from S3.
2. A worker node killed mid-training (SIGKILL to its `ray start` process group) and a fresh one started: training
   resumes from its last checkpoint in S3 in the same MLflow run, and its metrics have no gap.
3. A rerun after editing a comment in diffusion/: every stage is cached.

Needs root (mount namespaces): without it the fixture fails with that reason.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
import requests
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.pipelines.test_submit import BIN, ROOT, raydiff
from tests.s3server import s3_bucket

pytestmark = pytest.mark.slow
KILL_STEPS = 300  # long enough that a registered checkpoint comes well before the end

PIPELINE = """
name: {name}
tracking: {{uri: "{tracking}", experiment: cluster}}
storage: {{root: "{storage}"}}
stages:
  ingest:
    source: {{kind: sklearn_digits}}
    image: {{size: 8, channels: 1}}
  train:
    needs: [ingest]
    model: {{preset: tiny}}
    schedule: {{num_timesteps: 50}}
    steps: {steps}
    batch_size: 32
    workers: 2
    cpus_per_worker: 1
    resources_per_worker: {{trainer: 1}}
    placement_strategy: STRICT_SPREAD
    warmup_steps: 5
    log_every: 5
    checkpoint_every: 10
    eval_every: 0
    eval_batches: 1
    eval_batch_size: 16
    sample_grid: 4
    sample_ddpm_steps: 2
    sample_ddim_steps: 2
    max_failures: 3
    system_metrics_interval_s: 2
    retries: 1
"""

DOWNSTREAM = """
  evaluate:
    needs: [train]
    bpd_batches: 1
    bpd_batch_size: 16
    samplers: [ddim-2]
    num_fid_samples: 16
    sample_batch_size: 16
    guidance_scales: []
  register:
    needs: [evaluate]
    model_name: cluster-ddpm
    promote_if: {{metric: test_bpd, mode: min}}
  deploy:
    needs: [register]
    port: {port}
    max_batch_size: 4
"""

# A worker node's private view: /tmp is a fresh tmpfs. A checkout (and its .venv) under /tmp is carried over by
# bind-mounting it to a holding directory first and moving that mount back after the tmpfs is in place.
NAMESPACE_SCRIPT = """set -e
if [ -n "$RD_KEEP" ]; then mount --bind "$RD_KEEP" "$RD_HOLD"; fi
mount -t tmpfs none /tmp
if [ -n "$RD_KEEP" ]; then mkdir -p "$RD_KEEP"; mount --move "$RD_HOLD" "$RD_KEEP"; fi
mkdir -p "$RAYDIFF_CACHE_DIR"
exec "$@"
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


class Cluster:
    """The head (in this mount namespace) and worker nodes (each in its own), with the env every node gets."""

    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env, self.tag = work, env, secrets.token_hex(3)
        self.gcs, self.dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.processes: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.temp_dirs: list[Path] = []
        self.logs = work / "ray-logs"
        self.logs.mkdir()

    def _start(self, command: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{log_name}.log", "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def _ray(self, temp_dir: Path, cpus: int, *args: str) -> list[str]:
        self.temp_dirs.append(temp_dir)
        return [str(BIN / "ray"), "start", *args, "--block", "--num-cpus", str(cpus), "--node-ip-address",
                "127.0.0.1", "--temp-dir", str(temp_dir)]

    def start_head(self) -> None:
        args = ["--head", "--port", str(self.gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard), *node_ports(head=True)]
        env = {**self.env, "RAYDIFF_CACHE_DIR": str(self.work / "head-cache")}
        self._start(self._ray(Path("/tmp") / f"rc-{self.tag}-h", 3, *args), "head", env)

    def start_worker(self, name: str) -> subprocess.Popen:
        """A worker node in a new mount namespace with a private /tmp: it sees none of the head's files there."""
        keep = next((str(p) for p in (ROOT, Path(sys.prefix)) if str(p).startswith("/tmp/")), "")
        hold = Path(f"/var/tmp/rc-hold-{self.tag}-{name}")
        hold.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "RAYDIFF_CACHE_DIR": f"/tmp/raydiff-cache-{name}", "RD_KEEP": keep, "RD_HOLD": str(hold)}
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "sh",
                   *self._ray(Path("/tmp") / f"rc-{self.tag}-{name}", 2, "--address", f"127.0.0.1:{self.gcs}",
                              "--resources", '{"trainer": 1}', *node_ports(head=False))]
        self.workers[name] = self._start(command, name, env)
        return self.workers[name]

    def wait(self, count: int) -> list[str]:
        alive = [p for p in self.processes if p.poll() is None]
        return wait_for_nodes(count, self.address, self.env["RAY_AUTH_TOKEN"], alive, self.logs)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the node's whole process group (its raylet and every worker process), as a lost machine."""
        process = self.workers.pop(name)
        children = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        process.wait(timeout=10)
        self.processes.remove(process)

    def cache_of(self, name: str) -> Path:
        """The node's RAYDIFF_CACHE_DIR as the node itself sees it (through /proc/PID/root)."""
        return Path(f"/proc/{self.workers[name].pid}/root/tmp/raydiff-cache-{name}")


def start_mlflow(work: Path, artifacts: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with a sqlite backend and proxied artifacts in S3; returns (process, tracking URI)."""
    port = free_port()
    log = open(work / "mlflow-server.log", "w")
    process = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                                "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{uri}/health", timeout=2).ok:
                return process, uri
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start; see {work / 'mlflow-server.log'}")
        time.sleep(0.5)


def can_make_namespaces() -> str | None:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot create a mount namespace (root needed): {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    problem = can_make_namespaces()
    if problem:
        pytest.fail(problem)
    endpoint, credentials = s3_server
    work = tmp_path_factory.mktemp("cluster")
    bucket = s3_bucket(endpoint, f"cluster-{secrets.token_hex(3)}")
    name = bucket[len("s3://"):].split("?")[0]
    token = secrets.token_hex(16)
    env = {**os.environ, **credentials, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
           "AWS_ENDPOINT_URL": f"http://{endpoint}", "MLFLOW_S3_ENDPOINT_URL": f"http://{endpoint}",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    for variable in ("MLFLOW_TRACKING_URI", "RAYDIFF_CACHE_DIR"):
        env.pop(variable, None)
    mlflow_server, tracking = start_mlflow(work, f"s3://{name}/mlartifacts", env)
    nodes = Cluster(work, env)
    # Processes on these nodes that look the cluster up (Ray Train's placement-group cleaner) find this one, not
    # another Ray instance on the machine.
    env["RAY_ADDRESS"] = f"127.0.0.1:{nodes.gcs}"
    try:
        nodes.start_head()
        nodes.wait(1)
        for worker in ("w1", "w2"):
            nodes.start_worker(worker)
        nodes.wait(3)
        project = work / "project"
        for package in ("diffusion", "pipelines", "services"):
            shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
        yield {"nodes": nodes, "tracking": tracking, "bucket": name, "endpoint": endpoint, "project": project,
               "storage": bucket.replace(f"{name}?", f"{name}/pipelines?"), "token": token, "env": env}
    finally:
        stop(nodes.processes, nodes.temp_dirs)
        for temp_dir in nodes.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        mlflow_server.terminate()
        mlflow_server.wait(timeout=20)


def write_pipeline(cluster: dict, name: str, steps: int, downstream: bool) -> str:
    text = PIPELINE.format(name=name, tracking=cluster["tracking"], storage=cluster["storage"], steps=steps)
    if downstream:
        cluster.setdefault("serve_port", free_port())
        text += DOWNSTREAM.format(port=cluster["serve_port"])
    (cluster["project"] / f"{name}.yaml").write_text(text)
    return f"{name}.yaml"


def submit(cluster: dict, pipeline: str, timeout: int = 300) -> subprocess.CompletedProcess:
    out = raydiff("submit", pipeline, "--address", cluster["nodes"].address, token=cluster["token"],
                  cwd=cluster["project"], timeout=timeout)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    return out


def stage_runs(client: MlflowClient, pipeline_run: str) -> dict:
    experiment = client.get_experiment_by_name("cluster")
    runs = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline_run}'")
    return {run.data.tags["raydiff.stage"]: run for run in runs}


def pipeline_run_id(output: str) -> str:
    return output.split("MLflow run ", 1)[1].split()[0]


def s3_files(cluster: dict, prefix: str) -> list[str]:
    fs = s3(cluster)
    selector = pafs.FileSelector(f"{cluster['bucket']}/{prefix}", recursive=True, allow_not_found=True)
    return [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]


def test_the_whole_pipeline_on_nodes_that_share_nothing(cluster):
    out = submit(cluster, write_pipeline(cluster, "cluster-full", steps=20, downstream=True))
    for stage in ("ingest", "train", "evaluate", "register", "deploy"):
        assert f"[raydiff] {stage:<10} done" in out.stdout, out.stdout[-6000:]
    reply = requests.post(f"http://127.0.0.1:{cluster['serve_port']}/v1/samples",
                          json={"num_images": 2, "steps": 2, "seed": 1}, timeout=60)
    assert reply.status_code == 200, reply.text
    client = MlflowClient(cluster["tracking"])
    runs = stage_runs(client, pipeline_run_id(out.stdout))
    assert set(runs) == {"ingest", "train", "evaluate", "register", "deploy"}
    train = runs["train"]
    assert train.info.status == "FINISHED" and train.data.metrics["loss"] > 0
    worker_nodes = json.loads(train.data.tags["raydiff.worker_nodes"])  # one rank on each worker node
    assert len(set(worker_nodes)) == 2 and train.data.tags["raydiff.num_nodes"] == "2", train.data.tags
    assert len(json.loads(train.data.tags["raydiff.worker_hosts"])) == 2
    assert train.data.params["train.placement_strategy"] == "STRICT_SPREAD"
    assert any(key.startswith("system/node-") for key in train.data.metrics), sorted(train.data.metrics)
    assert client.list_artifacts(train.info.run_id, "samples"), "the training run's sample grids"
    assert runs["evaluate"].data.metrics, "the evaluate stage's metrics"
    stored = s3_files(cluster, "mlartifacts")
    source = client.get_model_version("cluster-ddpm", "1").source  # models:/m-<id>: MLflow's logged model
    assert any(source.split("/")[-1] in path and path.endswith("/MLmodel") for path in stored), (source, stored)
    assert any("/ray/train/checkpoint_" in path for path in s3_files(cluster, "pipelines/stages")), "checkpoints in S3"
    for worker in ("w1", "w2"):  # each node downloaded the split itself; the head's files are not there
        downloads = list((cluster["nodes"].cache_of(worker) / "downloads").glob("*/manifest.json"))
        assert downloads, f"node {worker} localized no split"


def kill_run(client: MlflowClient) -> list:
    """The training runs of the kill test's pipeline (the only ones with KILL_STEPS steps)."""
    experiment = client.get_experiment_by_name("cluster")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"params.`train.steps` = '{KILL_STEPS}'")


def s3(cluster: dict) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=cluster["endpoint"], scheme="http", region="us-east-1",
                             access_key="testing", secret_key="testing")


def checkpoint_registered(cluster: dict, run_id: str) -> bool:
    """Whether the Ray Train controller of the training run `run_id` has registered a checkpoint: its snapshot in S3
    names one (a report that returned on the workers may not have reached the controller yet)."""
    fs, stages = s3(cluster), f"{cluster['bucket']}/pipelines/stages"
    for info in fs.get_file_info(pafs.FileSelector(stages, allow_not_found=True)):
        if not info.base_name.startswith("train-"):
            continue
        with contextlib.suppress(FileNotFoundError, OSError):
            with fs.open_input_stream(f"{info.path}/mlflow_run_id.txt") as stream:
                if stream.read().decode().strip() != run_id:
                    continue
            with fs.open_input_stream(f"{info.path}/ray/train/checkpoint_manager_snapshot.json") as stream:
                return json.loads(stream.read()).get("latest_checkpoint_result") is not None
    return False


def test_a_node_lost_mid_training_resumes_from_its_last_checkpoint_in_s3(cluster):
    nodes, client = cluster["nodes"], MlflowClient(cluster["tracking"])
    pipeline = write_pipeline(cluster, "cluster-kill", steps=KILL_STEPS, downstream=False)
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "submit", pipeline, "--address", nodes.address],
                           cwd=cluster["project"], env={**cluster["env"], "HOME": str(cluster["project"])},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (kill_run(client) and checkpoint_registered(cluster, kill_run(client)[0].info.run_id)):
        assert job.poll() is None and time.time() < deadline, job.stdout.read() if job.poll() is not None else ""
        time.sleep(0.5)
    nodes.kill_worker("w1")
    nodes.start_worker("w3")
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-6000:]
    [train] = kill_run(client)  # one run, resumed
    assert train.info.status == "FINISHED"
    starts = sorted(m.value for m in client.get_metric_history(train.info.run_id, "start_step"))
    assert starts[0] == 0 and starts[-1] >= 10, starts  # the restarted workers began at a checkpoint, not at 0
    logged = sorted({m.step for m in client.get_metric_history(train.info.run_id, "loss")})
    assert logged == list(range(5, KILL_STEPS + 1, 5)), logged  # one series, every interval present
    assert "[raydiff] train      done" in output


def test_a_rerun_after_a_comment_edit_is_all_cached(cluster):
    schedule = cluster["project"] / "diffusion" / "schedule.py"
    schedule.write_text(schedule.read_text() + "\n# a comment changes no stage's key\n")
    out = submit(cluster, "cluster-full.yaml")
    for stage in ("ingest", "train", "evaluate", "register", "deploy"):
        assert f"[raydiff] {stage:<10} cached" in out.stdout, out.stdout[-6000:]


def test_cluster_manifests_and_pipeline_assume_no_shared_disk():
    """Offline: Ray pods mount no volume but their own memory-backed /dev/shm; the cluster pipeline keeps its
    outputs and checkpoints in S3 and tracks to an MLflow server over HTTP."""
    from pipelines.spec import load_spec
    from tests.infra.test_manifests import DOCS, RAY_KINDS, pod_templates

    for _, doc in DOCS:
        if doc["kind"] not in RAY_KINDS:
            continue
        for where, template in pod_templates(doc):
            for volume in template["spec"].get("volumes", []):
                assert volume.get("emptyDir", {}).get("medium") == "Memory", f"{where}: shared volume {volume}"
    spec = load_spec(ROOT / "configs" / "cifar10-gpu.yaml", [])
    assert spec.storage.root.startswith("s3://") and spec.tracking.uri.startswith("http://")
    assert spec.stages["train"].retries >= 1
