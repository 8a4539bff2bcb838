"""The console of `raydiff run`: a real driver process with its own local Ray, run once on a pseudo-terminal (the live
display) and once into a pipe (plain lines), on stand-in stages that print what real ones print (progress lines,
an INFO log line, a warning repeated from several places) and one that fails."""

import fcntl
import io
import json
import os
import pty
import re
import select
import subprocess
import struct
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from pipelines.console import Console
from pipelines.stage import StageContext, StageKind, StageResult
from pipelines.stage_board import StageBoard
from tests.pipelines.cli_driver import cli_env

HERE = "tests.pipelines.test_console"
ROOT = Path(__file__).resolve().parents[2]
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TIMEOUT_S = 300


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = 3
    fail: str = ""


def run_steps(ctx: StageContext) -> StageResult:
    """Prints as the train stage does, logs an INFO line and the same warning three times, then fails if asked."""
    p = ctx.params
    print(f"[raydiff train] rank 0 of 1 starting at step 0/{p.steps} on cpu", flush=True)
    print("2026-12-05 00:36:39,728\tINFO stand_in.py:12 -- Reporting training result 1: TrainingReport()", flush=True)
    for step in range(1, p.steps + 1):
        time.sleep(0.5)
        print(f"[raydiff train] step {step}/{p.steps} loss {1.0 / step:.4f} {100 * step} img/s", flush=True)
        print(f"[2026-12-05 00:36:4{step},123 E 71{step} 72{step}] core_worker.cc:{step}: PreemptionWatcher: "
              f"max_restarts is 0 for actor {step}", file=sys.stderr, flush=True)
    if p.fail:
        raise ValueError(p.fail)
    return StageResult(values={"url": "http://127.0.0.1:1/"}, metrics={"steps": p.steps})


STEPS = StageKind(name="steps", params=f"{HERE}:StepParams", run=run_steps)


def pipeline(tmp: Path, fail: str = "") -> Path:
    stages = {"train": {"kind": f"{HERE}:STEPS", "steps": 3},
              "evaluate": {"kind": f"{HERE}:STEPS", "needs": ["train"], "steps": 1, "fail": fail}}
    raw = {"name": "console", "tracking": {"uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment": "console"},
           "storage": {"root": str(tmp / "store")}, "cluster": {"address": "local", "num_cpus": 2}, "stages": stages}
    path = tmp / "pipeline.yaml"
    path.write_text(json.dumps(raw))
    return path


def command(path: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", str(path), "--no-serve-wait"]


def run_on_pty(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run `args` with a pseudo-terminal as stdout and stderr; (exit code, everything it wrote)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    os.set_blocking(main, False)
    process = subprocess.Popen(args, cwd=cwd, env={**cli_env(), "TERM": "xterm"}, stdin=child,
                               stdout=child, stderr=child, start_new_session=True)
    os.close(child)
    chunks, deadline = [], time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        try:
            data = os.read(main, 65536) if ready else b""
        except OSError:  # EIO: the child side is closed
            data = b""
        chunks.append(data)
        if not data and process.poll() is not None:
            break
    os.close(main)
    code = process.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace")


def log_file(text: str) -> Path:
    return Path(re.search(r"own output: (\S+\.log)", text).group(1))


@pytest.fixture(scope="module")
def on_terminal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-pty")
    return run_on_pty(command(pipeline(tmp, fail="the held-out split is empty")), tmp)


@pytest.fixture(scope="module")
def into_pipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-pipe")
    return subprocess.run(command(pipeline(tmp)), cwd=tmp, env=cli_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_a_terminal_gets_one_live_display_and_the_failing_stages_cause(on_terminal):
    code, text = on_terminal
    assert code == 1, text
    assert CONTROL.search(text), "no live display: the terminal got no control codes"
    screen = CONTROL.sub("", text)
    assert "FAILED: stage 'evaluate' failed: ValueError: the held-out split is empty" in screen, screen
    assert re.search(r"train\s+done\s+\d+s\s+step 3/3 · loss 0\.3333 · 300 img/s", screen), screen
    assert re.search(r"evaluate\s+failed\s+\d+s\s+after [\d.]+s: ValueError: the held-out split", screen), screen
    assert "[raydiff] train      started" not in screen, "a terminal shows the stage rows, not the plain lines"
    assert screen.count("PreemptionWatcher") == 1, "a warning repeated with other numbers is shown once"
    assert "Reporting training result" not in screen
    log = log_file(screen).read_text()
    assert "Reporting training result 1" in log and log.count("PreemptionWatcher") == 4


def test_a_pipe_gets_plain_lines_in_todays_format(into_pipe):
    assert into_pipe.returncode == 0, into_pipe.stdout + into_pipe.stderr
    out, err = into_pipe.stdout, into_pipe.stderr
    assert "\x1b" not in out + err, "control codes in plain output"
    assert "[raydiff] train      started" in out and "[raydiff] evaluate   done" in out
    assert re.search(r"^\[raydiff train\] step 2/3 loss 0\.5000 200 img/s$", out, re.M), out
    assert out.index("[raydiff] evaluate   done") < out.index("[raydiff] pipeline 'console' finished")
    assert "Reporting training result" not in out + err and "Started a local Ray instance" not in out + err
    assert err.count("PreemptionWatcher") == 1, err
    log = log_file(out).read_text()
    assert "Reporting training result 1" in log and "[raydiff] evaluate   done" in log


def test_verbose_prints_everything_as_it_comes_and_writes_no_log(tmp_path):
    path = pipeline(tmp_path)
    out = subprocess.run([*command(path), "--verbose", "--set", "train.steps=1"], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"\(raydiff:console:train pid=\d+\).* Reporting training result 1", out.stdout), out.stdout
    assert "PreemptionWatcher" in out.stderr and "[raydiff] train      done" in out.stdout
    assert "own output:" not in out.stdout and not (tmp_path / "store" / "logs").exists()


def test_lines_are_sorted_into_console_and_log(tmp_path):
    """What a driver receives, Ray's relay prefixes and colours included, sorted without a Ray: a traceback is shown
    whole (a marker line split off by the relay included), INFO stays in the log, a warning shows once."""
    board = StageBoard([("train", "train", 0)])
    console = Console(board, tmp_path / "run.log", live=False)
    console.out, console.err = io.StringIO(), io.StringIO()
    relayed = ["\x1b[36m(RayTrainWorker pid=7)\x1b[0m [raydiff train] step 20/60 loss 1.0023 421 img/s",
               "(TrainController pid=8) Reporting training result 1: TrainingReport(checkpoint=None)",
               "(Cleaner pid=9) Traceback (most recent call last):", "(Cleaner pid=9)   File \"x.py\", line 1, in f",
               "(Cleaner pid=9)     alive = get(", "(Cleaner pid=9)             ^^^^", "(Cleaner pid=9) ^^^^",
               "(Cleaner pid=9) ConnectionError: two Ray instances", "(Cleaner pid=9) INFO after the traceback",
               "2026-12-05 00:35:47,370\tWARNING setup.py:85 -- token 1",
               "2026-12-05 00:35:48,370\tWARNING setup.py:85 -- token 2"]
    for line in relayed:
        console.handle("out" if "[raydiff train]" in line else "err", line)
    assert console.out.getvalue() == "[raydiff train] step 20/60 loss 1.0023 421 img/s\n"
    shown = console.err.getvalue().splitlines()
    assert shown[0] == "(Cleaner) Traceback (most recent call last):"
    assert shown[5] == "ConnectionError: two Ray instances"
    assert len(shown) == 7 and shown[6].endswith("token 1") and console.hidden == 1
    console.log.close()
    assert "Reporting training result 1" in (tmp_path / "run.log").read_text()


def test_settle_waits_for_a_line_still_in_flight(tmp_path):
    """Before leaving Ray the driver waits for lines its log monitor has not relayed yet: one arriving 0.7 s after a
    stage failed, then nothing, ends the wait half a second later; a steady stream is cut off at the limit."""
    console = Console(StageBoard([("train", "train", 0)]), tmp_path / "run.log", live=False)
    late = threading.Timer(0.7, console.handle, ("err", "(steps pid=3) the failing stage's last line"))
    start = time.monotonic()
    late.start()
    console.settle(at_least_s=1.0, quiet_s=0.5, at_most_s=5.0)
    assert 1.2 <= time.monotonic() - start < 2.5
    chatter = threading.Thread(target=lambda: [console.handle("out", "x") or time.sleep(0.1) for _ in range(30)])
    start = time.monotonic()
    chatter.start()
    console.settle(at_least_s=0.2, quiet_s=0.5, at_most_s=1.0)
    assert 1.0 <= time.monotonic() - start < 1.8
    chatter.join()
    console.log.close()
    assert "the failing stage's last line" in (tmp_path / "run.log").read_text()


def test_the_board_derives_eta_and_sampler_counts_from_the_stages_lines():
    now = [0.0]
    board = StageBoard([("ingest", "ingest", 0), ("train", "train", 0), ("evaluate", "evaluate", 2)],
                       clock=lambda: now[0])
    board.event("train", "started", "key abc", None)
    board.stage_line("train", None, "rank 0 of 2 starting at step 100/1100 on cpu")
    now[0] = 10.0
    board.stage_line("train", None, "step 200/1100 loss 0.5123 640 img/s")
    board.event("evaluate", "started", "", None)
    board.stage_line("evaluate", "evaluate", "ddim-10: FID 31.20 (floor 25.80)")
    rows = {name: (state, elapsed, progress) for name, state, elapsed, progress in board.rows_text()}
    assert rows["train"] == ("running", "10s", "step 200/1100 · loss 0.5123 · 640 img/s · ETA 1m30s")
    assert rows["evaluate"][2].startswith("samplers 1/2 · ddim-10: FID 31.20")
    assert rows["ingest"] == ("waiting", "", "")
    board.event("train", "done", "", {"url": "unused"})
    assert board.rows_text()[1][1:3] == ("done", "10s")
