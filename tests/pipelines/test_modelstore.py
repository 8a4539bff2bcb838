"""The model in MLflow, for real: a models-from-code pyfunc whose predict generates the same samples as raydiff,
`mlflow models serve -m models:/NAME@champion --env-manager local` answering HTTP on a loopback port, raydiff's
loaders (serving's and evaluate's) reading the safetensors directory; and the security cases: a registry version
holding a pickle that would write a marker file, tampered weights and an unknown config key are loaded by nothing."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion.packaged import MLFLOW_ARTIFACT, DiffusionModel
from diffusion.samplers import sample
from diffusion.unet import UNet, UNetConfig
from pipelines.modelstore import PYFUNC_FILE, load_model, log_model, signature
from services.loading import load
from tests.conftest import free_port

PARAMS = {"sampler": "ddim", "steps": 4, "seed": 3, "labels": [0, 2], "guidance": 2.0}


def tiny_model() -> DiffusionModel:
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny", num_classes=2)), "linear", 50,
                           {"training_run_id": "r0"}, class_names=["a", "b"]).eval()
    for param in model.parameters():
        nn.init.normal_(param, std=0.05)
    return model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, the logged model): `tiny` version 1 with alias champion."""
    root = tmp_path_factory.mktemp("modelstore")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)  # the registry follows it (setting one would leave MLFLOW_REGISTRY_URI behind)
    experiment = MlflowClient(uri).create_experiment("models", artifact_location=(root / "artifacts").as_uri())
    model = tiny_model()
    with mlflow.start_run(experiment_id=experiment) as run:
        log_model(model)
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "tiny").version
    MlflowClient(uri).set_registered_model_alias("tiny", "champion", version)
    yield uri, model, experiment
    mlflow.set_tracking_uri(None)


def expected_samples(model: DiffusionModel, count: int) -> torch.Tensor:
    y = torch.tensor(PARAMS["labels"])
    with torch.no_grad():
        return sample(model, model.schedule(), (count, 1, 8, 8), "ddim", PARAMS["steps"],
                      torch.Generator().manual_seed(PARAMS["seed"]), y=y, guidance_scale=PARAMS["guidance"])


def test_pyfunc_predict_generates_raydiff_samples_and_raydiff_loads_without_pyfunc(store):
    uri, model, _ = store
    pyfunc = mlflow.pyfunc.load_model("models:/tiny@champion")
    assert pyfunc.metadata.signature.to_dict() == signature(model).to_dict()
    images = pyfunc.predict(pd.DataFrame({"num_samples": [2]}), params=PARAMS)
    assert images.shape == (2, 1, 8, 8) and images.dtype == "float32"
    assert torch.equal(torch.from_numpy(images), expected_samples(model, 2))
    for loaded in (load_model("models:/tiny@champion"), load("models:/tiny@champion", uri, torch.device("cpu"))[0]):
        assert loaded.describe() == model.describe()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mlflow models serve exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def test_mlflow_models_serve_answers_with_the_same_samples(store, tmp_path):
    uri, model, _ = store
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts uvicorn by name from PATH
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/tiny@champion",
                                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                               env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                                    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process)
        body = json.dumps({"dataframe_split": {"columns": ["num_samples"], "data": [[2]]}, "params": PARAMS})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = torch.tensor(json.loads(response.read())["predictions"])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        log.close()
    assert predictions.shape == (2, 1, 8, 8)
    assert torch.allclose(predictions, expected_samples(model, 2), atol=1e-6)


class Payload(nn.Linear):
    """Unpickling this module runs code: it creates the marker file (stands in for any attacker's payload)."""

    marker: Path

    def __reduce_ex__(self, protocol):
        return (Path.touch, (self.marker,))


def register(name: str, experiment: str, log) -> str:
    with mlflow.start_run(experiment_id=experiment) as run:
        log()
    mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    return f"models:/{name}/1"


def loaders(uri: str):
    """Every way raydiff loads a registry model: serving (and so `raydiff sample`) and the evaluate stage."""
    return (lambda model_uri: load(model_uri, uri, torch.device("cpu")), load_model)


def test_a_version_holding_a_pickle_is_loaded_by_nothing_and_runs_no_code(store, tmp_path):
    import mlflow.pytorch

    uri, _, experiment = store
    payload = Payload(2, 1)
    payload.marker = tmp_path / "marker"
    model_uri = register("pickled", experiment, lambda: mlflow.pytorch.log_model(
        payload, name="model", serialization_format="pickle", pip_requirements=["torch"]))
    for loader in loaders(uri):
        with pytest.raises(ValueError, match="models:/pickled/1 is not a raydiff model.*never pickles"):
            loader(model_uri)
        assert not payload.marker.exists()
    with pytest.raises(Exception):
        mlflow.pyfunc.load_model(model_uri)  # the pyfunc flavour of a pickle does unpickle: the payload is real
    assert payload.marker.exists()


def log_tampered(model: DiffusionModel, tmp_path: Path, tamper) -> None:
    directory = model.save_pretrained(tmp_path / MLFLOW_ARTIFACT)
    tamper(directory)
    mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_FILE), artifacts={MLFLOW_ARTIFACT: str(directory)},
                            pip_requirements=["torch"])


def wrong_shape(directory: Path) -> None:
    tensors = load_file(directory / "model.safetensors")
    tensors["conv_out.weight"] = tensors["conv_out.weight"][:, :, :2].contiguous()
    save_file(tensors, directory / "model.safetensors")


def truncated(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def unknown_key(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "post_load_hook": "os.system"}))


@pytest.mark.parametrize("tamper, message", [
    (wrong_shape, r"tensor 'conv_out.weight' is torch.float32 \(1, 16, 2, 3\)"),
    (truncated, "model.safetensors: not a readable safetensors file"),
    (unknown_key, r"unknown config keys \['post_load_hook'\]"),
])
def test_tampered_versions_are_refused_naming_what_is_wrong(store, tmp_path, tamper, message):
    uri, model, experiment = store
    name = f"tampered-{tamper.__name__}".replace("_", "-")
    model_uri = register(name, experiment, lambda: log_tampered(model, tmp_path, tamper))
    for loader in loaders(uri):
        with pytest.raises(ValueError, match=message):
            loader(model_uri)
