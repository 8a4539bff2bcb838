"""The console of `raydiff run`: the pipeline's own lines and one live display of its stages; everything else (Ray's,
Ray Train's, Ray Data's and Serve's own output, INFO lines and access logs) in a log file.

Every line the process writes (its own, and the workers' lines that Ray relays, prefixed `(NAME pid=…)`) is sorted:
- `[raydiff] …`: the pipeline's own line: always shown;
- `[raydiff KIND] …`: a stage's progress: it updates the stage's row (a terminal) or is shown without Ray's prefix
  (a pipe or a file);
- a warning, an error or a traceback: shown once (later copies, numbers aside, only in the log);
- anything else: only in the log.
A terminal gets a live display (rich); a pipe or a file gets plain lines with no control codes, in today's format.
Every line, shown or not, is written to the log file.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, TextIO

from rich.console import Console as RichConsole
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipelines.output_capture import captured_output
from pipelines.stage_board import StageBoard, stage_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
RAY_PREFIX = re.compile(r"^\((?P<who>[^()]*?)\s*pid=[^)]*\)\s?")
STAGE_TASK = re.compile(r"^raydiff:[^:]+:(?P<stage>[^:\s]+)$")  # the runner names a stage's task raydiff:PIPELINE:STAGE
STAGE_LINE = re.compile(r"^\[raydiff (?P<kind>[\w-]+)\] (?P<text>.*)")
PROBLEM = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|\b[A-Z]\w*(Warning|Error|Exception)\b[:(]"
                     r"|^\[\S+ \S+ [WEF] \d+ \d+\]|Traceback \(most recent call last\)|Unhandled error")
CARETS = re.compile(r"^[\s^~]+$")  # a traceback's position markers (Ray's relay may split them off their line)
REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]")
STATE_STYLE = {"waiting": "dim", "running": "yellow", "retrying": "magenta", "done": "green", "cached": "cyan",
               "failed": "bold red", "skipped": "dim"}


def log_path(output_root: Path, pipeline: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return output_root / "logs" / f"{pipeline}-{stamp}.log"


class Console:
    """Shows the pipeline's lines and its stages; `handle` receives every captured line (from the capture thread)."""

    def __init__(self, board: StageBoard, log_file: Path, live: bool):
        self.board, self.log_path, self.live_mode = board, log_file, live
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_file, "a", buffering=1, encoding="utf-8")
        self.lock = threading.RLock()
        self.seen: set[str] = set()
        self.hidden = 0
        self.in_traceback: set[tuple[str, str]] = set()
        self.out: TextIO | None = None
        self.err: TextIO | None = None
        self.live: Live | None = None
        self.last_line_at = time.monotonic()

    # ---- what the driver says ---------------------------------------------------------------------------------

    def say(self, text: str, err: bool = False) -> None:
        """One or more lines of the pipeline's own (the summary, the start line): always shown."""
        with self.lock:
            for line in text.splitlines() or [""]:
                self.log.write(line + "\n")
                self._show(line, err)

    def stage(self, stage: str, status: str, detail: str = "", values: dict | None = None) -> None:
        """The runner's news of a stage."""
        with self.lock:
            line = stage_line(stage, status, detail)
            self.log.write(line + "\n")
            self.board.event(stage, status, detail, values)
            if not self.live_mode or status in ("failed", "retrying"):
                self._show(line, err=False)

    # ---- what the process (and Ray, for its workers) writes -----------------------------------------------------

    def handle(self, stream: str, raw: str) -> None:
        line = ANSI.sub("", raw).rstrip()
        self.last_line_at = time.monotonic()
        with self.lock:
            if self.log.closed:  # a straggler after the capture ended
                return
            self.log.write(line + "\n")
            prefix = RAY_PREFIX.match(line)
            who = prefix.group("who") if prefix else ""
            message = line[prefix.end():] if prefix else line
            if message.startswith("[raydiff] "):
                self._show(message, stream == "err")
            elif stage_match := STAGE_LINE.match(message):
                task = STAGE_TASK.match(who)
                self.board.stage_line(stage_match["kind"], task["stage"] if task else None, stage_match["text"])
                if not self.live_mode:
                    self._show(message, stream == "err")
            else:
                self._problem(stream, who, message)

    def _problem(self, stream: str, who: str, message: str) -> None:
        """Show warnings, errors and tracebacks (whole) once; the rest stays in the log."""
        source = (stream, who)
        if source in self.in_traceback:
            if not (message[:1].isspace() or CARETS.match(message)):  # the exception line ends the traceback
                self.in_traceback.discard(source)
            self._show(message, err=True)
            return
        if not PROBLEM.search(message):
            return
        if "Traceback (most recent call last)" in message:
            self.in_traceback.add(source)
        key = re.sub(r"\d+", "#", REPEATED.sub("", message))
        if key in self.seen and source not in self.in_traceback:
            self.hidden += 1
            return
        self.seen.add(key)
        self._show(f"({who}) {message}" if who else message, err=True)

    def settle(self, at_least_s: float = 1.0, quiet_s: float = 0.5, at_most_s: float = 5.0) -> None:
        """Wait for the lines Ray still relays from finished workers (its log monitor polls their files): at least
        `at_least_s`, then until nothing came for `quiet_s`, `at_most_s` in all. Called before leaving Ray, which drops
        whatever it has not relayed yet, such as a failing stage's last lines."""
        start = time.monotonic()
        while (now := time.monotonic()) < start + at_most_s:
            if now >= start + at_least_s and now - self.last_line_at >= quiet_s:
                return
            time.sleep(0.05)

    # ---- output -------------------------------------------------------------------------------------------------

    def _show(self, line: str, err: bool) -> None:
        if self.live is not None:
            self.live.console.print(Text(line), soft_wrap=True)
        elif self.out is not None:
            (self.err if err else self.out).write(line + "\n")

    def render(self) -> Table:
        table = Table.grid(padding=(0, 2))
        for name, state, elapsed, progress in self.board.rows_text():
            table.add_row(Text(name, style="bold"), Text(state, style=STATE_STYLE.get(state, "")),
                          Text(elapsed, justify="right"), Text(progress, overflow="ellipsis", no_wrap=True))
        return table

    def stop_display(self) -> None:
        """End the live display, leaving its last state on screen; later lines are plain."""
        with self.lock:
            if self.live is not None:
                self.live.refresh()
                self.live.stop()
                self.live = None

    @contextmanager
    def running(self) -> Iterator["Console"]:
        """Capture the process's output for as long as the block runs, with the live display on a terminal."""
        with captured_output(self.handle) as (out, err):
            self.out, self.err = out, err
            self.say(f"[raydiff] Ray's and the stages' own output: {self.log_path} (raydiff run --verbose shows it "
                     "here)")
            if self.live_mode:
                rich = RichConsole(file=out, force_terminal=True, highlight=False)
                self.live = Live(get_renderable=self.render, console=rich, refresh_per_second=4,
                                 redirect_stdout=False, redirect_stderr=False)
                self.live.start()
            try:
                yield self
            finally:
                self.stop_display()
                if self.hidden:
                    self.say(f"[raydiff] {self.hidden} repeated warning/error line(s) not shown again: see "
                             f"{self.log_path}", err=True)
                self.out = self.err = None
        self.log.close()
