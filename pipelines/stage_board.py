"""What the live display of `raydiff run` shows: one row per stage with its state, elapsed time and its own progress.

Progress comes from the lines stages already print (`[raydiff train] step 20/1200 loss 0.51 420 img/s`, `[raydiff
evaluate] ddim-10: FID …`, `[raydiff ingest] 1797 samples …`); a line names its stage kind, and Ray's prefix names
the stage when the stage's own task printed it (`(raydiff:PIPELINE:STAGE pid=…)`). A kind's lines that name no stage
(Ray Train's workers) go to the running stage of that kind.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

TRAIN_STEP = re.compile(r"step (\d+)/(\d+) loss ([-\d.naif]+) (\d+) img/s")
TRAIN_START = re.compile(r"starting at step (\d+)/(\d+)")
EVALUATE_SAMPLER = re.compile(r"^(\S+): FID ")
INGEST_DONE = re.compile(r"^(\d+ samples .*? in \d+ shards)")
FINAL_STATES = ("done", "cached", "failed", "skipped")


@dataclass
class StageRow:
    name: str
    kind: str
    expected_samplers: int = 0
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None
    progress: str = ""
    samplers_done: list[str] = field(default_factory=list)
    steps_seen: list[tuple[float, int]] = field(default_factory=list)  # (time, step) of the first and latest lines

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (now if self.ended is None else self.ended) - self.started


def stage_line(stage: str, status: str, detail: str = "") -> str:
    """The runner's line for a stage event, as pipes, files and `raydiff run --verbose` show it."""
    return f"[raydiff] {stage:<10} {status:<8} {detail}".rstrip()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StageBoard:
    """The stages' rows, updated by the runner's events and the stages' own lines."""

    def __init__(self, stages: list[tuple[str, str, int]], clock=time.monotonic):
        """`stages`: (name, kind, number of samplers it evaluates) in run order."""
        self.rows = {name: StageRow(name, kind, samplers) for name, kind, samplers in stages}
        self.clock = clock

    def event(self, stage: str, status: str, detail: str, values: dict | None) -> None:
        """The runner's news of a stage: started, running, retrying, cached, done, failed or skipped."""
        row = self.rows.get(stage)
        if row is None or status == "running":
            return
        now = self.clock()
        if status == "started" and row.started is None:
            row.started = now
        row.state = status if status != "started" else "running"
        if status in FINAL_STATES:
            row.ended = now if row.started is not None else None
        summary = _final_summary(row.kind, values or {}) if status in ("done", "cached") else ""
        if status in ("failed", "retrying", "skipped"):
            row.progress = detail
        elif summary:
            row.progress = summary

    def stage_line(self, kind: str, stage: str | None, text: str) -> None:
        """A `[raydiff KIND] text` line a stage printed; `stage` when Ray's prefix names it."""
        row = self.rows.get(stage) if stage else None
        if row is None:
            running = [r for r in self.rows.values() if r.kind == kind and r.state in ("running", "retrying")]
            if len(running) != 1:
                return
            row = running[0]
        if row.state in ("failed", "skipped"):  # late lines of a failed stage: its error stays in view
            return
        now = self.clock()
        if kind == "train" and (step := TRAIN_STEP.search(text)):
            row.progress = self._train_progress(row, now, *step.groups())
        elif kind == "train" and (start := TRAIN_START.search(text)):
            row.steps_seen = [(now, int(start.group(1)))]
            row.progress = f"step {start.group(1)}/{start.group(2)}"
        elif kind == "evaluate":
            if sampler := EVALUATE_SAMPLER.match(text):
                row.samplers_done.append(sampler.group(1))
            total = max(row.expected_samplers, len(row.samplers_done))
            row.progress = f"samplers {len(row.samplers_done)}/{total} · {text}"
        elif kind == "ingest" and (done := INGEST_DONE.match(text)):
            row.progress = done.group(1)
        elif not TRAIN_STEP.search(row.progress):
            row.progress = text

    @staticmethod
    def _train_progress(row: StageRow, now: float, step: str, total: str, loss: str, images_per_s: str) -> str:
        row.steps_seen = [*row.steps_seen[:1], (now, int(step))] if row.steps_seen else [(now, int(step))]
        text = f"step {step}/{total} · loss {loss} · {images_per_s} img/s"
        (t0, s0), (t1, s1) = row.steps_seen[0], row.steps_seen[-1]
        if s0 < s1 < int(total) and t1 > t0:
            text += f" · ETA {format_seconds((int(total) - s1) * (t1 - t0) / (s1 - s0))}"
        return text

    def rows_text(self) -> list[tuple[str, str, str, str]]:
        """(name, state, elapsed, progress) per stage, for a display."""
        now = self.clock()
        out = []
        for row in self.rows.values():
            elapsed = row.elapsed(now)
            out.append((row.name, row.state, "" if elapsed is None else format_seconds(elapsed), row.progress))
        return out


def _final_summary(kind: str, values: dict) -> str:
    """What a finished stage's record says that a person wants to see."""
    if kind == "deploy" and values.get("url"):
        return str(values["url"])
    if kind == "register" and "name" in values:
        verdict = "promoted" if values.get("promoted") else "not promoted"
        return f"models:/{values['name']}/{values.get('version')} ({verdict})"
    return ""
