"""Model registration against a real MLflow store: `champion` moves only to a strictly better version."""

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig
from pipelines.modelstore import log_model
from pipelines.register.registry import METRIC_TAG, beats, register_model


@pytest.fixture()
def model_uri(mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # mlflow.set_tracking_uri sets it; monkeypatch restores it
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run() as run:
        log_model(DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 50))
        mlflow.log_metric("test_bpd", 9.0)
    yield f"runs:/{run.info.run_id}/model"
    mlflow.set_tracking_uri(None)


def test_register_model_leaves_the_global_tracking_uri_alone(mlflow_uri, model_uri, monkeypatch):
    mlflow.set_tracking_uri(None)
    register_model(mlflow_uri, model_uri, "m", "test_bpd", 3.0, "min")
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_beats_is_strict_and_respects_direction():
    assert beats(1.0, 2.0, "min") and not beats(2.0, 1.0, "min") and not beats(1.0, 1.0, "min")
    assert beats(2.0, 1.0, "max") and not beats(1.0, 1.0, "max")
    assert beats(5.0, None, "min") and beats(5.0, float("nan"), "max") and not beats(float("nan"), 1.0, "min")


def test_champion_moves_only_on_improvement(mlflow_uri, model_uri):
    client = MlflowClient(mlflow_uri)
    first = register_model(mlflow_uri, model_uri, "m", "test_bpd", 3.0, "min")
    assert (first.version, first.promoted, first.champion_version, first.previous_champion) == ("1", True, "1", None)
    worse = register_model(mlflow_uri, model_uri, "m", "test_bpd", 3.5, "min")
    assert (worse.version, worse.promoted, worse.champion_version, worse.previous_value) == ("2", False, "1", 3.0)
    tie = register_model(mlflow_uri, model_uri, "m", "test_bpd", 3.0, "min")
    assert not tie.promoted and tie.champion_version == "1"
    better = register_model(mlflow_uri, model_uri, "m", "test_bpd", 2.5, "min")
    assert better.promoted and better.model_uri == "models:/m/4" and better.previous_champion == "1"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "4"
    assert client.get_model_version("m", "4").tags[METRIC_TAG + "test_bpd"] == "2.5"


def test_max_mode_and_custom_alias(mlflow_uri, model_uri):
    register_model(mlflow_uri, model_uri, "m", "acc", 0.5, "max", alias="best")
    higher = register_model(mlflow_uri, model_uri, "m", "acc", 0.7, "max", alias="best")
    lower = register_model(mlflow_uri, model_uri, "m", "acc", 0.6, "max", alias="best")
    assert higher.promoted and not lower.promoted
    assert str(MlflowClient(mlflow_uri).get_model_version_by_alias("m", "best").version) == "2"


def test_champion_registered_elsewhere_is_judged_by_its_run_metric(mlflow_uri, model_uri):
    client = MlflowClient(mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)
    outside = mlflow.register_model(model_uri, "m")  # no metric tag; its run logged test_bpd = 9.0
    client.set_registered_model_alias("m", "champion", outside.version)
    worse = register_model(mlflow_uri, model_uri, "m", "test_bpd", 9.5, "min")
    assert not worse.promoted and worse.previous_value == 9.0
    better = register_model(mlflow_uri, model_uri, "m", "test_bpd", 8.0, "min")
    assert better.promoted and str(client.get_model_version_by_alias("m", "champion").version) == better.version
