"""Load a packaged `DiffusionModel` from MLflow: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN/model`.

An alias is resolved to its version once, and that exact version is loaded, so the replica reports (and serves)
one well-defined model even if the alias moves while it loads. The model is read from the safetensors directory
inside the logged MLflow model (`DiffusionModel.from_pretrained`), never unpickled and without pyfunc; a version
holding anything else is refused.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass

import torch

from diffusion.packaged import DiffusionModel, fetch_logged_model


@dataclass(frozen=True)
class ModelRef:
    """What a replica serves: the URI asked for, the pinned URI loaded and the registry/run identity."""

    uri: str
    loaded_uri: str
    name: str
    version: str | None
    alias: str | None
    run_id: str | None  # the MLflow run that logged the model artifact
    training_run_id: str | None  # model.metadata["training_run_id"], else run_id

    def to_json(self) -> dict:
        return asdict(self)


def resolve(model_uri: str, tracking_uri: str | None) -> ModelRef:
    """Pin `model_uri` to a concrete version/run without loading anything."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if match := re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri):
        name, alias = match.groups()
        version = client.get_model_version_by_alias(name, alias)
        return ModelRef(model_uri, f"models:/{name}/{version.version}", name, str(version.version), alias,
                        version.run_id, None)
    if match := re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri):
        name, number = match.groups()
        version = client.get_model_version(name, number)
        aliases = list(getattr(version, "aliases", None) or [])
        return ModelRef(model_uri, model_uri, name, number, aliases[0] if aliases else None, version.run_id, None)
    if match := re.fullmatch(r"runs:/([0-9a-f]+)/(.+)", model_uri):
        run_id, path = match.groups()
        return ModelRef(model_uri, model_uri, path.rstrip("/").rsplit("/", 1)[-1], None, None, run_id, None)
    return ModelRef(model_uri, model_uri, model_uri.rstrip("/").rsplit("/", 1)[-1], None, None, None, None)


def load(model_uri: str, tracking_uri: str | None, device: torch.device) -> tuple[DiffusionModel, ModelRef]:
    """→ (the model in eval mode on `device`, its ModelRef). Raises ValueError for a model that is not a raydiff
    safetensors model directory (naming the URI) or whose config/weights are invalid (naming the key/tensor)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    ref = resolve(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model = DiffusionModel.from_pretrained(fetch_logged_model(
            ref.loaded_uri, lambda uri, dst: mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst), tmp),
            device)
    training_run_id = model.metadata.get("training_run_id") or ref.run_id
    ref = ModelRef(**{**asdict(ref), "training_run_id": training_run_id})
    return model.eval(), ref
