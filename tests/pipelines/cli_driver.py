"""`raydiff run` as a separate driver process with its own local Ray, and killing that driver (SIGKILL) the way a
lost terminal or node does: the resume tests."""

import os
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def cli_env() -> dict[str, str]:
    """This environment without a Ray address or MLflow setting that would point the driver elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_command(pipeline: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", str(pipeline), "--no-serve-wait"]


def start_driver(pipeline: Path, cwd: Path) -> subprocess.Popen:
    """`raydiff run PIPELINE` in the background, its output in cwd/first.log."""
    with open(cwd / "first.log", "w") as log:
        return subprocess.Popen(run_command(pipeline), cwd=cwd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_driver(driver: subprocess.Popen) -> list[str]:
    """SIGKILL the driver alone, give its Ray processes 20 s to follow it, kill those that do not, and return their
    names."""
    descendants = psutil.Process(driver.pid).children(recursive=True)
    names = {p.pid: p.name() for p in descendants}
    driver.kill()
    driver.wait(timeout=30)
    _, alive = psutil.wait_procs(descendants, timeout=20)
    for process in alive:
        process.kill()
    return [names[p.pid] for p in alive]


def rerun(pipeline: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`raydiff run PIPELINE` again, in the foreground (at most 10 min)."""
    return subprocess.run(run_command(pipeline), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
