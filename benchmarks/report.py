"""Shared benchmark plumbing: interleaved timing, result rows (ours vs a same-run baseline) and machine info."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Row:
    """One comparison: `ours` and `baseline` in `unit` (higher is better unless lower_is_better)."""

    what: str
    ours: float
    baseline: float | None
    unit: str
    target: str = ""
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if not self.baseline:
            return None
        return self.baseline / self.ours if self.lower_is_better else self.ours / self.baseline

    def line(self) -> str:
        ratio = f"{self.ratio:.2f}x" if self.ratio is not None else "-"
        base = f"{self.baseline:,.1f}" if self.baseline is not None else "-"
        return f"{self.what:<58} ours {self.ours:>12,.1f} {self.unit:<8} baseline {base:>12} ratio {ratio:>6}  target {self.target}"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each measurement `rounds` times in alternation (A B A B …) and return each one's median, so a noisy
    machine penalises both sides alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {name: statistics.median(values) for name, values in samples.items()}


def throughput(step: Callable[[], None], items_per_step: int, steps: int, warmup: int = 2) -> float:
    """Items per second of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return items_per_step * steps / (time.perf_counter() - start)


def emit(rows: list[Row], json_path: str | None, title: str) -> None:
    print(f"\n== {title} ({machine()})")
    for row in rows:
        print(row.line())
    if json_path:
        Path(json_path).write_text(json.dumps(
            {"title": title, "machine": machine(), "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}, indent=2))
