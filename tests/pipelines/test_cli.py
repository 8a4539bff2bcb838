"""`raydiff dag`, `raydiff ui`, the plugged-in `serve`/`sample` commands and the CLI's handling of invalid pipeline
files."""

import os
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import requests

from pipelines.cli import COMMANDS_GROUP, main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
LOCAL = str(ROOT / "configs" / "local.yaml")


def test_dag_text_mermaid_and_png(tmp_path, capsys):
    assert main(["dag", LOCAL]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "pipeline digits-local: 5 stages"
    assert "evaluate <- train   [model=train; data=ingest" in text
    assert main(["dag", LOCAL, "--format", "mermaid"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart LR") and "    ingest --> train" in mermaid
    png = tmp_path / "dag.png"
    assert main(["dag", LOCAL, "--format", "png", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command, option", [("serve", "--model-uri"), ("sample", "--sampler")])
def test_serve_and_sample_come_from_the_commands_entry_point(command, option, capsys):
    assert "serve" in {entry.name for entry in entry_points(group=COMMANDS_GROUP)}
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: raydiff {command}") and option in out


def test_invalid_pipelines_exit_2_with_every_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  train: {needs: [ingest], stepz: 3}\n  evaluate: {needs: [train, evaluate]}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages.train.stepz: unknown key" in err
    assert main(["dag", LOCAL, "--set", "train.model.presett=tiny", "--set", "steps=oops"]) == 2
    err = capsys.readouterr().err
    assert "stages.train.model.presett: unknown key" in err and "stages.train.steps: Input should be a valid integer" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_ui_serves_the_tracking_store(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        first = process.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first and str(tmp_path / "mlruns.db") in first
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow on a loaded machine
                time.sleep(0.5)
        else:
            raise AssertionError("the MLflow UI did not come up")
        experiments = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                   params={"max_results": 10}, timeout=5).json()
        assert [e["name"] for e in experiments["experiments"]] == ["Default"]
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
