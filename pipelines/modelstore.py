"""A raydiff model in MLflow: logged as a models-from-code pyfunc (`pipelines/pyfunc_model.py`) whose only artifact
is the `DiffusionModel.save_pretrained` directory (config.json + model.safetensors), so `mlflow.pyfunc.load_model`
and `mlflow models serve` can generate samples, while raydiff's own stages read the same directory directly
(`load_model`, no pyfunc). Nothing here unpickles: a model version without that directory is refused.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from diffusion.packaged import MLFLOW_ARTIFACT, DiffusionModel, fetch_logged_model

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
METADATA_KEYS = ("num_classes", "class_names", "prediction", "learn_variance", "schedule", "num_timesteps",
                 "zero_terminal_snr", "objective")


def signature(model: DiffusionModel):
    """Input: a column num_samples (long); params: sampler, steps, seed, labels, guidance; output [N, C, H, W]."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema([ParamSpec("sampler", "string", "ddim"), ParamSpec("steps", "long", 50),
                         ParamSpec("seed", "long", 0), ParamSpec("labels", "long", [], shape=(-1,)),
                         ParamSpec("guidance", "double", 1.0)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *model.image_shape))])
    return ModelSignature(inputs=Schema([ColSpec("long", "num_samples")]), outputs=outputs, params=params)


def log_model(model: DiffusionModel, name: str = "model") -> str:
    """Log `model` to the active MLflow run as `name` → its model URI (models:/m-…)."""
    import mlflow

    described = model.describe()  # classes, prediction type, schedule: readable without loading the model
    with tempfile.TemporaryDirectory() as tmp:
        directory = model.save_pretrained(Path(tmp) / MLFLOW_ARTIFACT)
        info = mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_FILE),
                                       artifacts={MLFLOW_ARTIFACT: str(directory)}, signature=signature(model),
                                       pip_requirements=["torch", "safetensors", "mlflow", "numpy", "pandas"],
                                       metadata={key: described.get(key) for key in METADATA_KEYS})
    return info.model_uri


def load_model(model_uri: str, device: torch.device | str = "cpu") -> DiffusionModel:
    """The DiffusionModel logged at `model_uri` (runs:/…, models:/NAME/VERSION, models:/NAME@ALIAS), in eval mode
    on `device`, read from its safetensors directory without pyfunc."""
    with tempfile.TemporaryDirectory() as tmp:
        return DiffusionModel.from_pretrained(fetch_logged_model(model_uri, _download, tmp), device)


def _download(uri: str, dst: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
