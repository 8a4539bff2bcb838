"""Clean shutdown on real processes, each with its own local Ray: SIGINT as Ctrl-C sends it (to the whole process
group) and SIGTERM as `kill` sends it (to the process). `raydiff serve` and `raydiff run` while it serves shut Serve
and Ray down and exit 0; `raydiff run` stopped mid-training exits 128 + signal with its MLflow runs KILLED. None
prints a Python traceback or a native stack dump."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines.stage import StageKind, StageResult
from pipelines.strict import StrictConfig
from tests.conftest import free_port
from tests.pipelines.test_pipeline_resume import PIPELINE as TRAINING
from tests.pipelines.test_pipeline_resume import checkpoint_registered

ROOT = Path(__file__).resolve().parents[2]
RAY_DAEMONS = ("raylet", "gcs_server")
pytestmark = pytest.mark.slow


class LoggedModel(StrictConfig):
    model_uri: str


def _logged_model(ctx) -> StageResult:
    return StageResult(values={"model_uri": ctx.params.model_uri})


# A stand-in for the train stage: a model that is already logged, so the deploy stage has something to serve.
LOGGED = StageKind(name="train", params="tests.pipelines.test_shutdown:LoggedModel", run=_logged_model)

SERVING = """
name: serve-until-stopped
tracking: {{uri: "{tracking_uri}", experiment: shutdown}}
storage: {{root: "{tmp}/store"}}
cluster: {{address: local, num_cpus: 2}}
stages:
  model: {{kind: "tests.pipelines.test_shutdown:LOGGED", model_uri: "{model_uri}"}}
  deploy: {{needs: [model], port: {port}, name: stop-test}}
"""

TRAINING_STEPS = 400  # far more than run before the signal


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, runs:/… URI) of an untrained tiny DiffusionModel logged to a fresh sqlite store."""
    import mlflow
    import torch

    from diffusion.packaged import DiffusionModel
    from diffusion.unet import UNet, UNetConfig
    from pipelines.modelstore import log_model
    from pipelines.tracking import ensure_experiment, use_tracking_uri

    tracking_uri = f"sqlite:///{tmp_path_factory.mktemp('shutdown-mlflow') / 'mlruns.db'}"
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 100).eval()
    experiment_id = ensure_experiment(tracking_uri, "shutdown")
    with use_tracking_uri(tracking_uri), mlflow.start_run(experiment_id=experiment_id) as run:
        log_model(model)
    return tracking_uri, f"runs:/{run.info.run_id}/model"


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": str(ROOT)}


class Raydiff:
    """`python -m pipelines.cli ARGS` in its own session, stdout and stderr in files under `tmp`."""

    def __init__(self, args: list[str], tmp: Path, name: str):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp, env=cli_env(),
                                            stdout=out, stderr=err, start_new_session=True)

    def logs(self) -> str:
        return f"--- stdout\n{self.out.read_text()[-3000:]}\n--- stderr\n{self.err.read_text()[-5000:]}"

    def wait_for(self, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited with {self.process.returncode}\n{self.logs()}"
            assert time.monotonic() < deadline, f"timed out\n{self.logs()}"
            time.sleep(0.2)

    def stop(self, sig: int) -> int:
        """Send `sig` (SIGINT to the process group, as a terminal's Ctrl-C does; anything else to the process) and
        return the exit code; Ray's daemons must be gone too."""
        descendants = psutil.Process(self.process.pid).children(recursive=True)
        self.signalled_at = {path: path.stat().st_size for path in (self.out, self.err)}
        if sig == signal.SIGINT:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=120)
            _, alive = psutil.wait_procs(descendants, timeout=30)
            assert not [p for p in alive if p.name() in RAY_DAEMONS], f"Ray still runs\n{self.logs()}"
        finally:
            for process in [self.process, *descendants]:
                try:
                    process.kill()
                except (psutil.NoSuchProcess, ProcessLookupError):
                    pass
        return code

    def assert_clean(self) -> None:
        """Nothing written after the signal (by the CLI or by Ray's processes through it) shows a traceback or a
        native stack dump. What Ray's workers print earlier is not the shutdown's (with two Ray instances on one host
        Ray Train's placement-group monitor prints one at start-up)."""
        for path, offset in self.signalled_at.items():
            with open(path, "rb") as handle:
                text = handle.read()[offset:].decode(errors="replace")
            for mark in ("Traceback", "*** SIGTERM received", "*** SIGINT received", "PC: @"):
                assert mark not in text, f"{path.name} shows {mark!r} after the signal\n{self.logs()}"


def test_serve_stops_on_sigterm(tmp_path, logged_model):
    tracking_uri, model_uri = logged_model
    serve = Raydiff(["serve", "--model-uri", model_uri, "--tracking-uri", tracking_uri, "--port", str(free_port()),
                     "--num-cpus", "2", "--device", "cpu"], tmp_path, "serve")
    serve.wait_for(lambda: "[raydiff] serving" in serve.out.read_text(), timeout=180)
    assert serve.stop(signal.SIGTERM) == 0, serve.logs()
    assert "SIGTERM: stopping" in serve.out.read_text()
    serve.assert_clean()


def test_run_stops_serving_on_ctrl_c(tmp_path, logged_model):
    tracking_uri, model_uri = logged_model
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(SERVING.format(tmp=tmp_path, tracking_uri=tracking_uri, model_uri=model_uri, port=free_port()))
    run = Raydiff(["run", str(pipeline)], tmp_path, "run")
    run.wait_for(lambda: "[raydiff] serving" in run.out.read_text(), timeout=180)
    assert run.stop(signal.SIGINT) == 0, run.logs()
    assert "SIGINT: stopping" in run.out.read_text()
    run.assert_clean()


def test_run_stopped_mid_training_exits_143_with_its_runs_killed(tmp_path):
    """The pipeline of tests/pipelines/test_pipeline_resume.py, whose next run resumes from the checkpoint: the
    training run is reopened whatever its status."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(TRAINING.format(tmp=tmp_path, steps=TRAINING_STEPS))
    run = Raydiff(["run", str(pipeline)], tmp_path, "run")
    run.wait_for(lambda: checkpoint_registered(tmp_path), timeout=300)
    assert run.stop(signal.SIGTERM) == 128 + signal.SIGTERM, run.logs()
    run.assert_clean()
    assert "SIGTERM: pipeline 'resume-tiny' stopped" in run.err.read_text()
    train_dir = next(tmp_path.glob("store/stages/train-*"))
    assert not (train_dir / "raydiff-stage.json").exists(), "training finished before the signal; raise STEPS"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    train_run = client.get_run((train_dir / "mlflow_run_id.txt").read_text().strip())
    (parent,) = client.search_runs([train_run.info.experiment_id], "tags.`raydiff.role` = 'pipeline'")
    assert train_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "KILLED" and train_run.info.status == "KILLED"
