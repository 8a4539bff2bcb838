"""What a sweep shows while it runs and leaves behind: the status file (`sweep_status.json`, rewritten on every trial
event and read by `raydiff sweep-status`), progress lines, the trials table and the metric-vs-parameters plot."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

STATUS_FILE = "sweep_status.json"
FINISHED, STOPPED, FAILED, RUNNING, PENDING = "finished", "stopped_early", "failed", "running", "pending"


@dataclass
class TrialRow:
    index: int
    trial_id: str
    params: dict[str, Any]
    status: str = PENDING
    step: int = 0
    value: float | None = None  # the metric at the trial's last report
    run_id: str | None = None
    error: str | None = None
    model_uri: str | None = None
    checkpoint_path: str | None = None


@dataclass
class SweepStatus:
    stage: str
    metric: str
    mode: str
    steps: int
    total: int
    trials: dict[str, TrialRow] = field(default_factory=dict)  # trial id → row
    updated: float = 0.0

    def best(self, finished_only: bool = False) -> TrialRow | None:
        return select_best(self.trials.values(), self.mode, finished_only)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((FINISHED, STOPPED, FAILED, RUNNING, PENDING), 0)
        for row in self.trials.values():
            counts[row.status] = counts.get(row.status, 0) + 1
        counts[PENDING] += max(0, self.total - len(self.trials))
        return counts

    def to_json(self) -> dict:
        data = asdict(self)
        data["trials"] = [asdict(r) for r in sorted(self.trials.values(), key=lambda r: r.index)]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "SweepStatus":
        rows = {r["trial_id"]: TrialRow(**r) for r in data.pop("trials")}
        return cls(**data, trials=rows)

    def write(self, directory: Path) -> None:
        self.updated = time.time()
        path = Path(directory) / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=str))
        os.replace(tmp, path)

    def lines(self) -> list[str]:
        """A table of the trials and the best so far (what `raydiff sweep-status` prints)."""
        counts = self.counts()
        head = (f"sweep {self.stage!r}: {self.total} trials — {counts[FINISHED]} finished, {counts[STOPPED]} stopped "
                f"early, {counts[FAILED]} failed, {counts[RUNNING]} running, {counts[PENDING]} pending "
                f"({self.metric}, {self.mode})")
        lines = [head, f"  {'trial':<10} {'status':<14} {'step':>7} {self.metric:>12}  params"]
        best = self.best()
        for row in sorted(self.trials.values(), key=lambda r: r.index):
            value = "-" if row.value is None else f"{row.value:.5g}"
            mark = " *" if best is not None and row.trial_id == best.trial_id else ""
            params = ", ".join(f"{k.removeprefix('train.')}={_short(v)}" for k, v in row.params.items())
            lines.append(f"  trial-{row.index:<4} {row.status:<14} {row.step:>4}/{self.steps:<4} {value:>10}  "
                         f"{params}{mark}")
            if row.error:
                lines.append(f"      error: {row.error.splitlines()[0][:200]}")
        if best is not None:
            lines.append(f"  best so far: trial-{best.index} {self.metric}={best.value:.5g} at step {best.step}"
                         + (f" (MLflow run {best.run_id})" if best.run_id else ""))
        return lines


def select_best(rows, mode: str, finished_only: bool = False) -> TrialRow | None:
    """The row with the lowest (mode min) or highest (mode max) metric value; NaN and missing values never win."""
    candidates = [r for r in rows if r.value is not None and math.isfinite(r.value)
                  and (r.status == FINISHED or not finished_only)]
    if not candidates:
        return None
    pick = min if mode == "min" else max
    return pick(candidates, key=lambda r: (r.value, r.index) if mode == "min" else (r.value, -r.index))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_printer(status: SweepStatus, log: Callable[[str], None]) -> Callable[[TrialRow, str], None]:
    def say(row: TrialRow, event: str) -> None:
        counts, best = status.counts(), status.best()
        value = "" if row.value is None else f" {status.metric}={row.value:.4g}"
        best_text = f", best trial-{best.index} {status.metric}={best.value:.4g}" if best else ""
        log(f"[raydiff sweep] {status.stage} trial-{row.index} {event} step {row.step}/{status.steps}{value} "
            f"({counts[FINISHED] + counts[STOPPED] + counts[FAILED]}/{status.total} done, "
            f"{counts[RUNNING]} running{best_text})")
    return say


def write_trials_csv(status: SweepStatus, path: Path) -> Path:
    keys = sorted({k for r in status.trials.values() for k in r.params})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "trial_id", "status", "step", status.metric, *keys, "run_id", "error"])
        for row in sorted(status.trials.values(), key=lambda r: r.index):
            writer.writerow([row.index, row.trial_id, row.status, row.step, row.value,
                             *[row.params.get(k) for k in keys], row.run_id, (row.error or "").splitlines()[0:1]])
    return path


def plot_metric_vs_params(status: SweepStatus, log_keys: set[str], path: Path) -> Path:
    """One scatter per search key: the metric at each trial's last report against the trial's value, coloured by
    status (categorical values on an index axis, log axes for loguniform keys), the best trial circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in status.trials.values() for k in r.params})
    colours = {FINISHED: "tab:blue", STOPPED: "tab:orange", FAILED: "tab:red", RUNNING: "tab:gray", PENDING: "tab:gray"}
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.6), squeeze=False)
    best = status.best(finished_only=True)
    rows = [r for r in status.trials.values() if r.value is not None and math.isfinite(r.value)]
    for ax, key in zip(axes[0], keys):
        values = [r.params.get(key) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})
        xs = values if numeric else [categories.index(str(v)) for v in values]
        for status_name, colour in colours.items():
            points = [(x, r.value) for x, r in zip(xs, rows) if r.status == status_name]
            if points:
                ax.scatter(*zip(*points), c=colour, label=status_name.replace("_", " "), s=28)
        if best is not None and key in best.params:
            bx = best.params[key] if numeric else categories.index(str(best.params[key]))
            ax.scatter([bx], [best.value], s=140, facecolors="none", edgecolors="black", label="best")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        elif key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(status.metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{status.stage}: {status.metric} ({status.mode}) at each trial's last report", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def find_status_files(storage_root: str | Path, stage: str | None = None) -> list[Path]:
    """Status files of sweeps under a local storage root, newest first (optionally of one stage name)."""
    files = sorted(Path(storage_root).glob(f"stages/sweep-*/{STATUS_FILE}"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    if stage is None:
        return files
    return [f for f in files if json.loads(f.read_text()).get("stage") == stage]
