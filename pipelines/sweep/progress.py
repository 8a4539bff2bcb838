"""The sweep's Ray Tune callback: keeps the status file current and prints a line per trial event.

Tune pickles its callbacks with the experiment and a restored experiment brings back those objects, so the callback
holds only the sweep directory and finds the driver's live status object in `LIVE` (filled by run_sweep).
"""

from __future__ import annotations

from pathlib import Path

from ray.tune import Callback

from pipelines.sweep.report import FAILED, FINISHED, RUNNING, STOPPED, TrialRow
from pipelines.sweep.trial import error_line, trial_index

LIVE: dict[str, tuple] = {}  # sweep dir → (SweepStatus, say(row, event))


class Progress(Callback):
    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def _event(self, trial, update, event: str | None) -> None:
        if self.sweep_dir not in LIVE:
            return
        status, say = LIVE[self.sweep_dir]
        row = status.trials.get(trial.trial_id)
        if row is None:
            row = status.trials[trial.trial_id] = TrialRow(index=trial_index(trial.trial_id), trial_id=trial.trial_id,
                                                           params=dict(trial.config))
        event = update(row) or event
        status.write(Path(self.sweep_dir))
        if event:
            say(row, event)

    def on_trial_start(self, iteration, trials, trial, **info):
        def update(row):
            row.status = RUNNING
        self._event(trial, update, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        def update(row):
            row.step = int(result.get("step", row.step))
            metric = LIVE[self.sweep_dir][0].metric
            if metric in result:
                row.value = float(result[metric])
            if result.get("model_uri"):
                row.status, row.model_uri = FINISHED, result["model_uri"]
                row.run_id, row.checkpoint_path = result.get("run_id"), result.get("checkpoint_path")
        self._event(trial, update, None if result.get("done") else "reported")

    def on_trial_complete(self, iteration, trials, trial, **info):
        def update(row):
            if row.status != FINISHED:
                row.status = STOPPED
                return "stopped early at"
            return "finished"
        self._event(trial, update, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        def update(row):
            row.status, row.error = FAILED, _error_text(trial)
        self._event(trial, update, "failed at")


def _error_text(trial) -> str:
    """The trial's own exception, one line (Tune keeps the error text in the trial's error file)."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return error_line(text) or (lines[-1] if lines else "unknown error")
