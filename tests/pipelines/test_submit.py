"""`raydiff submit/status/logs` against a real Ray head started here with `ray start --head` (token auth on), over
the Jobs API's HTTP endpoint.

The job's working dir is a copy of the project's packages plus the pipeline file (the stand-in stages of
test_dag_runner, so the job takes seconds); a sparse 600 MB file in its `.venv/` proves the upload excludes.
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A throwaway Ray cluster with a dashboard on free ports; stopped by signalling the processes it started."""
    token = secrets.token_hex(16)
    temp_dir = Path("/tmp") / f"rd-{secrets.token_hex(3)}"  # short: Ray's socket paths must fit in 107 bytes
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "4", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
               *[str(part) for item in ports.items() for part in item]]
    log = open(tmp_path_factory.mktemp("ray-head") / "ray-start.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"},
                                timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed; see {log.name}")
            time.sleep(1)
        yield {"address": address, "token": token}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
        for process in leftovers:
            process.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def make_project(tmp_path: Path, fail: bool = False) -> Path:
    """The job's working dir: the project's packages, a pipeline file, and junk the upload must leave behind."""
    project = tmp_path / "project"
    for package in ("diffusion", "pipelines", "services", "tests"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".venv").mkdir()
    with open(project / ".venv" / "huge.bin", "wb") as handle:
        handle.truncate(600 * 1024 * 1024)
    (project / "mlruns.db").write_bytes(b"local store, not for the cluster")
    stages = "tests.pipelines.test_dag_runner"
    b_params = "fail_times: -1" if fail else "value: 10"
    (project / "pipeline.yaml").write_text(f"""
name: submitted
tracking: {{experiment: submitted}}
stages:
  a: {{kind: "{stages}:SOURCE", value: 1, log: "{tmp_path}/log.jsonl"}}
  b: {{kind: "{stages}:SUM", needs: [a], log: "{tmp_path}/log.jsonl", {b_params}}}
""")
    return project


def raydiff(*args: str, token: str | None, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["HOME"] = str(cwd)  # no ~/.ray/auth_token to fall back on
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_follows_the_job_then_status_and_logs(ray_head, tmp_path):
    project = make_project(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = raydiff("submit", "pipeline.yaml", "--address", ray_head["address"], "--set", f"tracking.uri={store}",
                  "--set", f"storage.root={tmp_path / 'store'}", token=ray_head["token"], cwd=project)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("submitted job ", 1)[1].split()[0]
    assert "[raydiff] b          done" in out.stdout and f"job {job_id} SUCCEEDED" in out.stdout

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("submitted")
    parents = client.search_runs([experiment.experiment_id], "tags.`raydiff.role` = 'pipeline'")
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert len(list((tmp_path / "store" / "stages").glob("sum-*/raydiff-stage.json"))) == 1

    status = raydiff("status", job_id, "--address", ray_head["address"], token=ray_head["token"], cwd=project)
    assert status.returncode == 0 and f"job {job_id}: SUCCEEDED" in status.stdout
    listing = raydiff("status", "--address", ray_head["address"], token=ray_head["token"], cwd=project)
    assert job_id in listing.stdout and "submitted" in listing.stdout
    logs = raydiff("logs", job_id, "--address", ray_head["address"], token=ray_head["token"], cwd=project)
    assert "[raydiff] a          done" in logs.stdout


def test_submit_no_wait_then_follow_a_failing_job(ray_head, tmp_path):
    project = make_project(tmp_path, fail=True)
    out = raydiff("submit", "pipeline.yaml", "--no-wait", "--address", ray_head["address"],
                  "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", "--set", f"storage.root={tmp_path}/s",
                  token=ray_head["token"], cwd=project, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("submitted job ", 1)[1].split()[0]
    follow = raydiff("logs", job_id, "--follow", "--address", ray_head["address"], token=ray_head["token"],
                     cwd=project)
    assert follow.returncode == 1
    assert "b failed on purpose" in follow.stdout and f"job {job_id} FAILED" in follow.stdout


def test_submit_refuses_bad_specs_and_missing_tokens(ray_head, tmp_path):
    project = make_project(tmp_path)
    bad = raydiff("submit", "pipeline.yaml", "--set", "b.valeu=1", "--address", ray_head["address"],
                  token=ray_head["token"], cwd=project, timeout=60)
    assert bad.returncode == 2 and "stages.b.valeu: unknown key" in bad.stderr
    anonymous = raydiff("submit", "pipeline.yaml", "--address", ray_head["address"], token=None, cwd=project,
                        timeout=60)
    assert anonymous.returncode != 0 and "uthentication" in anonymous.stderr
