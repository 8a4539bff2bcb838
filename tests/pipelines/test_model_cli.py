"""`raydiff import-diffusers` registers a diffusers DDPM directory in MLflow (loadable like a trained model) and
`raydiff export --format diffusers` writes a directory that diffusers.DDPMPipeline.from_pretrained loads."""

import os

import mlflow
import torch
from diffusers import DDPMPipeline
from torch import nn

from diffusion.interop import save_diffusers_dir
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig
from pipelines.cli import main
from pipelines.modelstore import load_model


def test_import_then_export_round_trips_through_the_registry(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default experiment's artifacts land here
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset("tiny", downsample_padding=0, norm_eps=1e-6)), "linear", 100)
    for param in model.parameters():
        nn.init.normal_(param, std=0.05)
    save_diffusers_dir(model.eval(), tmp_path / "hub-dir")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    assert main(["import-diffusers", str(tmp_path / "hub-dir"), "--name", "imported",
                 "--tracking-uri", mlflow_uri]) == 0
    # MLflow's process-wide state stays as it was, so later code in this process talks to its own store
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ and os.environ.get("MLFLOW_TRACKING_URI") != mlflow_uri
    assert mlflow.get_registry_uri() != mlflow_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    registered = load_model("models:/imported@champion")
    assert registered.config == model.config and registered.num_timesteps == 100
    assert main(["export", "models:/imported@champion", "--format", "diffusers", str(tmp_path / "out"),
                 "--tracking-uri", mlflow_uri]) == 0
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "out")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 99])
    with torch.no_grad():
        assert torch.allclose(pipeline.unet(x, t).sample, model(x, t), atol=1e-5, rtol=0)
    assert pipeline.scheduler.config.num_train_timesteps == 100
