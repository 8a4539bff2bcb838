"""Register a model version in the MLflow Model Registry and move the `champion` alias to it only if it beats the
current champion on a chosen metric.

Every version we register carries its metric as a tag (`raydiff.metric.<name>`), so the comparison needs no run
lookups; for a champion registered some other way the metric of its source run is used. A version that merely
ties the champion is not promoted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.tracking import use_tracking_uri

METRIC_TAG = "raydiff.metric."


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    alias: str
    metric: str
    value: float
    promoted: bool
    champion_version: str  # the alias's version after this registration
    previous_champion: str | None
    previous_value: float | None

    def to_json(self) -> dict:
        return asdict(self)


def beats(value: float, incumbent: float | None, mode: Literal["min", "max"]) -> bool:
    """True when `value` is strictly better than `incumbent` (any finite value beats no or a non-finite incumbent)."""
    if not math.isfinite(value):
        return False
    if incumbent is None or not math.isfinite(incumbent):
        return True
    return value < incumbent if mode == "min" else value > incumbent


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_metric(client: MlflowClient, version: ModelVersion, metric: str) -> float | None:
    """The metric recorded on the version, else the metric of its source run, else None."""
    tagged = (version.tags or {}).get(METRIC_TAG + metric)
    if tagged is not None:
        return float(tagged)
    if version.run_id:
        return client.get_run(version.run_id).data.metrics.get(metric)
    return None


def register_model(tracking_uri: str, model_uri: str, name: str, metric: str, value: float,
                   mode: Literal["min", "max"] = "min", alias: str = "champion",
                   tags: dict[str, str] | None = None) -> Registration:
    """Register `model_uri` (runs:/… or models:/…) as a new version of `name`; promote it if it beats the champion."""
    client = MlflowClient(tracking_uri)
    with use_tracking_uri(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags={**(tags or {}), METRIC_TAG + metric: repr(float(value)),
                                                               "raydiff.metric_mode": mode})
    incumbent = version_by_alias(client, name, alias)
    previous_value = version_metric(client, incumbent, metric) if incumbent is not None else None
    promoted = beats(float(value), previous_value, mode) if incumbent is not None else math.isfinite(value)
    if promoted:
        client.set_registered_model_alias(name, alias, version.version)
    champion = version.version if promoted else (incumbent.version if incumbent is not None else None)
    return Registration(name=name, version=str(version.version), model_uri=f"models:/{name}/{version.version}",
                        alias=alias, metric=metric, value=float(value), promoted=promoted,
                        champion_version=str(champion) if champion is not None else "",
                        previous_champion=str(incumbent.version) if incumbent is not None else None,
                        previous_value=previous_value)
