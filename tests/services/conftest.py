"""Fixtures for the serving tests: a tiny DDPM trained on sklearn digits, registered in a real MLflow sqlite store,
served by real Ray Serve on 127.0.0.1 (one application for the whole package; Serve shut down at the end)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port

MODEL_NAME = "digits-tiny"
COND_MODEL_NAME = "digits-tiny-cond"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_x0():
    """sklearn digits as float32 [1797, 1, 8, 8] in [−1, 1] (pixel values 0…16)."""
    import torch
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)
    return (images / 8.0 - 1.0).unsqueeze(1)


def train_tiny(steps: int = 150, seed: int = 0, batch_size: int = 64, metadata: dict | None = None):
    """A tiny-preset DiffusionModel (8×8×1, T = 1000) after `steps` Adam steps of L_simple on digits."""
    import torch

    from diffusion.losses import l_simple
    from diffusion.packaged import DiffusionModel
    from diffusion.unet import UNet, UNetConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only add contention on a 2-core host
    torch.manual_seed(seed)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 1000, metadata=metadata)
    sched = model.schedule()
    x0 = digits_x0()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        batch = x0[torch.randint(0, len(x0), (batch_size,))]
        loss = l_simple(model, sched, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def train_tiny_conditional(steps: int = 60, seed: int = 0, batch_size: int = 64, p_uncond: float = 0.1):
    """A 10-class tiny DiffusionModel (digit names as class names) after `steps` Adam steps of L_simple on digits
    with their labels, each label dropped to the null class with probability `p_uncond` (classifier-free guidance
    training)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from diffusion.packaged import DiffusionModel
    from diffusion.process import model_timesteps, q_sample
    from diffusion.unet import UNet, UNetConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny", num_classes=10)), "linear", 1000, class_names=DIGIT_NAMES)
    sched = model.schedule()
    x0, y0 = digits_x0(), torch.tensor(load_digits().target, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x0), (batch_size,))
        y = torch.where(torch.rand(batch_size) < p_uncond, 10, y0[index])
        t = torch.randint(0, sched.num_timesteps, (batch_size,))
        noise = torch.randn_like(x0[index])
        loss = F.mse_loss(model(q_sample(sched, x0[index], t, noise), model_timesteps(sched, t), y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def log_and_register(model, tracking_uri: str, name: str = MODEL_NAME, alias: str | None = "champion",
                     experiment: str = "serve-tests") -> str:
    """Log `model` in a run whose id goes into model.metadata["training_run_id"], register it, set `alias`.
    → the registered version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.modelstore import log_model

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=exp_id) as run:
        model.metadata["training_run_id"] = run.info.run_id
        log_model(model)
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT/
    port: int
    tracking_uri: str
    model_uri: str
    training_run_id: str
    app_name: str = "raydiff-test"


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(url.rstrip("/") + "/readyz", timeout=15)
            if r.status_code == 200:
                return
            last = r.text
        except requests.RequestException as error:
            last = error
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


@pytest.fixture(scope="package")
def trained(tmp_path_factory):
    """(tracking_uri, trained model) with the model registered as MODEL_NAME v1 @champion."""
    tmp = tmp_path_factory.mktemp("serve-mlflow")
    tracking_uri = f"sqlite:///{tmp / 'mlruns.db'}"
    model = train_tiny()
    log_and_register(model, tracking_uri)
    return tracking_uri, model


@pytest.fixture(scope="package")
def served(ray_session, trained):
    """The app on a free loopback port: max_batch_size 8, a 0.2 s batch window so concurrent requests merge."""
    from ray import serve

    from services.deploy import deploy

    tracking_uri, model = trained
    serve.shutdown()  # another package may have left Serve running on another port
    port = free_port()
    model_uri = f"models:/{MODEL_NAME}@champion"
    url = deploy(model_uri, tracking_uri, port=port, max_batch_size=8, name="raydiff-test",
                 batch_wait_timeout_s=0.2, max_num_images=32, request_timeout_s=60, max_body_bytes=256 * 1024,
                 device="cpu")
    wait_ready(url)
    yield Served(url, port, tracking_uri, model_uri, model.metadata["training_run_id"])
    serve.shutdown()


@pytest.fixture(scope="package")
def served_conditional(served):
    """A class-conditional model (COND_MODEL_NAME v1 @champion, digit names as class names) as a second application
    on the same Serve instance, under /cond/ — deployed only when a test asks for it."""
    from services.deploy import deploy

    model = train_tiny_conditional()
    log_and_register(model, served.tracking_uri, name=COND_MODEL_NAME)
    model_uri = f"models:/{COND_MODEL_NAME}@champion"
    url = deploy(model_uri, served.tracking_uri, route_prefix="/cond", port=served.port, max_batch_size=8,
                 name="raydiff-cond", batch_wait_timeout_s=0.2, max_num_images=32, request_timeout_s=60,
                 max_body_bytes=256 * 1024, device="cpu")
    url = url.rstrip("/") + "/"
    wait_ready(url)
    yield Served(url, served.port, served.tracking_uri, model_uri, model.metadata["training_run_id"], "raydiff-cond")
