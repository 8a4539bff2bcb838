"""The sweep stage's parameters: the train stage's parameters, a search space over them (dotted keys), the trial
budget, the metric and an optional early-stopping scheduler. Everything is checked before a trial runs.

    search:
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      train.ema.decay: {choice: [0.999, 0.9999]}
      train.model.ch: {grid: [16, 32]}            # every value, num_trials times each (Ray Tune's grid_search)

Search keys name a train parameter as `train.<field>[.<field>…]`. The trial's configuration is the stage's `train`
mapping with the sampled values put at those paths, validated by whatever TrainConfig is at run time, so a key the
training does not know is an error that names it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipelines.strict import StrictConfig
from pipelines.train.config import TrainConfig

# What the training loop (pipelines.train.loop) logs at its log_every steps, and the held-out ELBO parts it adds at
# its eval_every steps (pipelines.train.monitor.heldout_elbo → pipelines.evaluate.bpd metrics with prefix "val").
TRAIN_METRICS = ("loss", "grad_norm", "lr", "images_per_s", "epoch", "cpu_peak_rss_mb", "gpu_peak_mem_mb")
VAL_METRICS = ("val_bpd", "val_prior_bpd", "val_vb_bpd", "val_decoder_bpd", "val_bpd_stderr")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class Domain(StrictConfig):
    """Exactly one of: uniform / loguniform / randint ([low, high], randint inclusive), choice / grid (values)."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_distribution(self) -> "Domain":
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid"):
            if not value:
                raise ValueError(f"{kind}: empty list of values")
        else:
            low, high = value
            if not low < high:
                raise ValueError(f"{kind}: empty range [{low}, {high}] (low must be below high)")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: range [{low}, {high}] must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)

    def probe_values(self) -> list[Any]:
        """Values that cover the domain's edges: both ends of a range, every listed value."""
        return list(self.spec)

    def to_tune(self):
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.spec)
        if self.kind == "loguniform":
            return tune.loguniform(*self.spec)
        if self.kind == "randint":
            return tune.randint(self.spec[0], self.spec[1] + 1)
        if self.kind == "choice":
            return tune.choice(list(self.spec))
        return tune.grid_search(list(self.spec))


class MetricSpec(StrictConfig):
    name: str = "val_bpd"
    mode: Literal["min", "max"] = "min"


class SchedulerSpec(StrictConfig):
    """ASHA (asynchronous successive halving) on training steps: at rungs grace_steps · reduction_factor^k, a trial
    whose metric is worse than the best 1/reduction_factor of the trials that reached that rung is stopped."""

    kind: Literal["asha"] = "asha"
    grace_steps: PositiveInt = Field(description="training steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="2 stops the worse half at each rung")


class SweepConfig(StrictConfig):
    train: TrainConfig = TrainConfig()
    search: dict[str, Domain] = Field(min_length=1)
    num_trials: PositiveInt = Field(8, description="trials sampled from the space (times the grid's size)")
    max_concurrent: PositiveInt = Field(2, description="trials running at once")
    metric: MetricSpec = MetricSpec()
    scheduler: SchedulerSpec | None = None
    seed: int = Field(0, description="seed of the search's sampling")
    resource_wait_s: float = Field(600.0, ge=0.0, description="how long trials that the cluster cannot hold yet "
                                   "(GPU nodes scaling from zero) wait for the autoscaler before the sweep fails")

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        """Errors carry their own paths (search.train.lr, metric.name, ...), so the pipeline file's messages name them."""
        errors: list[tuple[tuple[str, ...], str]] = []
        for key, domain in self.search.items():
            if not key.startswith("train.") or len(key) == len("train."):
                errors.append((("search", key), "search keys name a train parameter, e.g. train.lr"))
                continue
            for value in domain.probe_values():
                try:
                    trial_config(self.train, {key: value})
                except (ValidationError, ValueError) as error:
                    message = _one_line(error)
                    if not message.endswith(("unknown key", "is not a mapping")):
                        message = f"{domain.kind} value {value!r}: {message}"
                    errors.append((("search", key), message))
                    break
        errors += self._metric_errors()
        if self.scheduler is not None:
            steps, every = self.train.steps, self.train.checkpoint_every
            if self.scheduler.grace_steps >= steps:
                errors.append((("scheduler", "grace_steps"), f"{self.scheduler.grace_steps} leaves no room to stop a "
                               f"trial early (train.steps is {steps})"))
            if every >= steps:
                errors.append((("scheduler",), f"trials report to Tune every train.checkpoint_every ({every}) steps, so "
                               f"early stopping needs checkpoint_every below train.steps ({steps})"))
        if errors:
            raise ValidationError.from_exception_data("SweepConfig", [
                InitErrorDetails(type=PydanticCustomError("sweep", message.replace("{", "{{").replace("}", "}}")),
                                 loc=loc, input=None) for loc, message in errors])
        return self

    def _metric_errors(self) -> list[tuple[tuple[str, ...], str]]:
        name, train, where = self.metric.name, self.train, ("metric", "name")
        if name not in TRAIN_METRICS + VAL_METRICS:
            return [(where, f"training never logs {name!r}; it logs {', '.join(TRAIN_METRICS + VAL_METRICS)}")]
        if name in VAL_METRICS:
            if train.eval_every == 0 or train.checkpoint_every % train.eval_every:
                return [(where, f"{name} is measured every train.eval_every ({train.eval_every}; 0 = at the end only) "
                                f"steps but trials report to Tune every train.checkpoint_every "
                                f"({train.checkpoint_every}) steps; make checkpoint_every a multiple of eval_every")]
        elif name in ("loss", "grad_norm", "lr", "images_per_s", "epoch") and train.checkpoint_every % train.log_every:
            return [(where, f"{name} is logged every train.log_every ({train.log_every}) steps but trials report "
                            f"to Tune every train.checkpoint_every ({train.checkpoint_every}); make checkpoint_every a "
                            "multiple of log_every")]
        return []

    def total_trials(self) -> int:
        grid = math.prod(len(d.grid) for d in self.search.values() if d.grid is not None)
        return self.num_trials * grid


def set_dotted(values: dict, path: list[str], value: Any, where: str) -> None:
    """values[path[0]][path[1]]… = value; intermediate mappings must exist or be absent (then created)."""
    target = values
    for depth, part in enumerate(path[:-1]):
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{where}: {'.'.join(path[:depth + 1])} is not a mapping")
        target = child
    target[path[-1]] = value


def trial_config(train: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The stage's train parameters with each `train.a.b: value` override applied, validated by TrainConfig."""
    values = train.model_dump(mode="json", exclude_unset=False)
    for key, value in overrides.items():
        set_dotted(values, key.split(".")[1:], value, key)
    return TrainConfig.model_validate(values)


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors():
            loc = ".".join(str(p) for p in item["loc"])
            message = "unknown train parameter: unknown key" if item["type"] == "extra_forbidden" else item["msg"]
            parts.append(f"train.{loc}: {message}" if loc else message)
        return "; ".join(parts)
    return str(error).splitlines()[0]
