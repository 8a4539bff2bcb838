"""One sweep trial: a Ray Tune trainable that runs the train stage's `run_training` (Ray Train, the one training
loop) with the trial's parameters and passes each Ray Train report on to Tune.

The Ray Train controller hands every report to `QueueReporter`, which puts it on a queue the trainable's `step`
reads, so Tune (and its scheduler) see the training's metrics at its checkpoint steps. When Tune stops a trial early,
`cleanup` aborts the trial's Ray Train controller, which shuts its workers down and frees their placement group.

A trial's files live in `<sweep dir>/trials/trial-NNN/` (NNN = Tune's trial index, stable across an experiment
restore), so a restored trial resumes its Ray Train run and its MLflow run from there.
"""

from __future__ import annotations

import json
import re
import threading
import traceback
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train.v2.api.callback import UserCallback

RESULT_FILE = "trial_result.json"
ERROR_FILE = "error.txt"  # the traceback of a failed trial
TRIAL_ACTOR_CPUS = 0.01  # the trial actor only waits on Ray Train's controller; its workers hold the CPUs


def trial_index(trial_id: str) -> int:
    """Tune's trial ids end in the trial's index: 'a1b2c_00003' → 3."""
    return int(trial_id.rsplit("_", 1)[-1])


def trial_dir(sweep_dir: Path, index: int) -> Path:
    return Path(sweep_dir) / "trials" / f"trial-{index:03d}"


class TrialFailed(RuntimeError):
    """A trial's training raised; the message is `trial-N failed: <the exception, one line>`."""


def error_line(text: str) -> str | None:
    """The one-line cause from a TrialFailed message or traceback text (the last `trial-N failed: ...` line)."""
    found = re.findall(r"^\w[\w.]*: trial-\d+ failed: (.*)$", text, flags=re.MULTILINE)
    return found[-1].strip() if found else None


class QueueReporter(UserCallback):
    """Runs in the Ray Train controller: each report's rank-0 metrics (and, once, the controller's own handle) go on
    the trial's queue."""

    def __init__(self, queue):
        self.queue = queue
        self.sent_handle = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not self.sent_handle:
            self.queue.put({"kind": "controller", "handle": ray.get_runtime_context().current_actor})
            self.sent_handle = True
        item = dict(metrics[0]) if metrics else {}
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path
        self.queue.put({"kind": "report", "metrics": item})


class SweepTrial(tune.Trainable):
    """config: the trial's overrides (`train.lr: 0.001`, ...); context: what every trial shares (see run_sweep)."""

    def setup(self, config: dict, context: dict) -> None:
        from ray.util.queue import Queue

        from pipelines.sweep.config import trial_config
        from pipelines.train.config import TrainConfig

        self.context = context
        self.index = trial_index(self.trial_id)
        self.output_dir = trial_dir(Path(context["sweep_dir"]), self.index)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.train_config = trial_config(TrainConfig.model_validate(context["train"]), dict(config))
        self.queue = Queue(actor_options={"num_cpus": 0})  # unbounded: the controller never waits on Tune
        self.controller = None
        self.last: dict[str, Any] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._train, name=f"sweep-trial-{self.index}", daemon=True)
        self.thread.start()

    def _train(self) -> None:
        from pipelines.train.stage import run_training

        ctx = self.context
        try:
            result = run_training(self.train_config, Path(ctx["train_dir"]),
                                  Path(ctx["val_dir"]) if ctx["val_dir"] else None, self.output_dir,
                                  ctx["tracking_uri"], ctx["experiment"], run_name=f"{ctx['stage']}/trial-{self.index}",
                                  parent_run_id=ctx["sweep_run_id"], callbacks=[QueueReporter(self.queue)])
            summary = {"model_uri": result.model_uri, "run_id": result.run_id, "final_step": result.final_step,
                       "checkpoint_path": result.checkpoint_path,
                       "metrics": {k: float(v) for k, v in result.metrics.items()}}
            (self.output_dir / RESULT_FILE).write_text(json.dumps(summary))
            self.queue.put({"kind": "done", "result": summary})
        except BaseException as error:  # noqa: BLE001 — handed to Tune, which records the trial as failed
            if not self.stopping:
                text = " | ".join(line.strip() for line in "".join(
                    traceback.format_exception_only(type(error), error)).splitlines() if line.strip())
                (self.output_dir / ERROR_FILE).write_text(traceback.format_exc())
                self.queue.put({"kind": "error", "error": text})

    def step(self) -> dict:
        while True:
            item = self.queue.get()
            if item["kind"] == "controller":
                self.controller = item["handle"]
            elif item["kind"] == "report":
                self.last = item["metrics"]
                return dict(self.last)
            elif item["kind"] == "done":  # the run's last MLflow metrics stand in when it reported nothing here
                result = dict(item["result"])  # (a restored trial whose training had already finished)
                return {"step": result["final_step"], **result.pop("metrics"), **self.last, **result, "done": True}
            else:
                raise TrialFailed(f"trial-{self.index} failed: {item['error']}")

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Nothing to save: the trial's Ray Train run keeps its own checkpoints in the trial directory."""
        return None

    def load_checkpoint(self, checkpoint) -> None:
        return None

    def cleanup(self) -> None:
        """Tune stops the trial (early stopping, or the sweep ends): abort a training still running, gracefully."""
        self.stopping = True
        if not self.thread.is_alive():
            return
        while self.controller is None and self.thread.is_alive():  # the handle comes with the first report
            try:
                item = self.queue.get(timeout=1.0)
            except Exception:  # noqa: BLE001 — queue.Empty
                continue
            if item["kind"] == "controller":
                self.controller = item["handle"]
        if self.controller is not None:
            try:
                ray.get(self.controller.abort.remote(), timeout=120)
            except Exception:  # noqa: BLE001 — abort ends the controller, so the call itself fails
                pass
        self.thread.join(timeout=60)
