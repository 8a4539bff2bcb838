"""Ray Train training with real local Ray (2 CPU workers), real webdataset shards and a real sqlite MLflow store."""

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from diffusion.packaged import DiffusionModel
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.stage import run_ingest
from pipelines.modelstore import load_model
from pipelines.train.config import TrainConfig
from pipelines.train.stage import run_training

TINY = {"model": {"preset": "tiny"}, "batch_size": 32, "workers": 2, "cpus_per_worker": 1.0, "lr": 1e-3,
        "warmup_steps": 10, "log_every": 10, "checkpoint_every": 20, "eval_every": 0, "eval_batches": 1,
        "eval_batch_size": 16, "sample_grid": 9, "sample_ddpm_steps": 20, "sample_ddim_steps": 5,
        "ema": {"half_life_steps": 10}}


@pytest.fixture(scope="module")
def digits_8x8(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    result = run_ingest(IngestConfig.model_validate({"image": {"size": 8, "channels": 1}}), root, progress=False)
    return result.splits["train"], result.splits["val"]


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_bad_configs_fail_before_ray_with_the_field_named():
    for bad, field in [({"lerning_rate": 1e-3}, "lerning_rate"), ({"lr": -1.0}, "lr"),
                       ({"batch_size": 30, "workers": 4}, "not divisible by workers"),
                       ({"model": {"preset": "huge"}}, "model.preset"), ({"model": {"chanels": 3}}, "model.chanels")]:
        with pytest.raises(ValidationError, match=field):
            TrainConfig.model_validate(bad)


def test_training_loss_falls_and_everything_lands_in_mlflow(digits_8x8, tmp_path, mlflow_uri):
    train_dir, val_dir = digits_8x8
    config = TrainConfig.model_validate({**TINY, "steps": 120, "eval_every": 120})
    result = run_training(config, train_dir, val_dir, tmp_path / "out", mlflow_uri, "test-train", "train")
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.final_step == 120
    losses = [v for _, v in metric_history(mlflow_uri, result.run_id, "loss")]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    for key in ("lr", "grad_norm", "images_per_s", "cpu_peak_rss_mb", "val_bpd", "val_prior_bpd",
                "val_vb_bpd", "val_decoder_bpd"):
        assert key in run.data.metrics, key
    assert run.data.metrics["val_bpd"] == pytest.approx(
        run.data.metrics["val_prior_bpd"] + run.data.metrics["val_vb_bpd"] + run.data.metrics["val_decoder_bpd"], rel=1e-6)
    assert run.data.params["train.batch_size"] == "32" and run.data.params["unet.ch"] == "16"
    assert run.data.tags["ray_version"] and run.data.tags["git_commit"]
    assert len(json.loads(run.data.tags["raydiff.worker_nodes"])) == 2  # one node id per rank ...
    assert run.data.tags["raydiff.num_nodes"] == "1"  # ... both on the one local node
    artifacts = {a.path for d in ("elbo", "samples") for a in client.list_artifacts(result.run_id, d)}
    assert artifacts == {"elbo/vb_per_t_step120.png", "samples/ddpm-20_step120.png", "samples/ddim-5_step120.png"}
    mlflow.set_tracking_uri(mlflow_uri)
    model = load_model(result.model_uri)
    assert isinstance(model, DiffusionModel) and model.image_shape == (1, 8, 8)
    assert model.metadata["training_steps"] == 120
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).shape == (2, 1, 8, 8)


def test_second_invocation_resumes_the_same_run(digits_8x8, tmp_path, mlflow_uri):
    train_dir, _ = digits_8x8
    out = tmp_path / "out"
    first = run_training(TrainConfig.model_validate({**TINY, "steps": 40}), train_dir, None, out, mlflow_uri, "t", "train")
    second = run_training(TrainConfig.model_validate({**TINY, "steps": 60}), train_dir, None, out, mlflow_uri, "t", "train")
    assert second.run_id == first.run_id and second.final_step == 60
    assert [v for _, v in metric_history(mlflow_uri, first.run_id, "start_step")] == [0, 40]
    assert [s for s, _ in metric_history(mlflow_uri, first.run_id, "loss")] == [10, 20, 30, 40, 50, 60]


def _train_worker_pids() -> list[int]:
    """Ray Train workers of this test session's Ray (its raylet is a child of this process), never another's."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("RayTrainWorker" in part for part in process.cmdline()):
                pids.append(process.pid)
    return pids


def _registered_checkpoint(snapshot: Path) -> bool:
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def run_killing_a_worker(run, ray_run_dir: Path) -> None:
    """Run `run` in a thread and SIGKILL one Ray Train worker once the controller has registered a checkpoint in
    `ray_run_dir` (its snapshot on storage names one: a report that has returned on the workers may not have reached
    the controller yet); wait for `run` to finish."""
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    snapshot = ray_run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and not _registered_checkpoint(snapshot):
        time.sleep(0.5)
    assert _registered_checkpoint(snapshot), f"no checkpoint registered in {snapshot} within 240 s"
    pids = _train_worker_pids()
    assert pids, "no Ray Train worker process found to kill"
    psutil.Process(pids[-1]).send_signal(signal.SIGKILL)
    thread.join(timeout=300)


def test_killed_worker_is_restarted_from_the_last_checkpoint(digits_8x8, tmp_path, mlflow_uri):
    train_dir, _ = digits_8x8
    out = tmp_path / "out"
    config = TrainConfig.model_validate({**TINY, "steps": 300})
    outcome = {}
    run_killing_a_worker(lambda: outcome.setdefault(
        "result", run_training(config, train_dir, None, out, mlflow_uri, "t", "train")), out / "ray" / "train")
    result = outcome["result"]
    assert result.final_step == 300
    starts = [v for _, v in metric_history(mlflow_uri, result.run_id, "start_step")]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 20, starts  # continued, not restarted
    assert MlflowClient(mlflow_uri).get_run(result.run_id).info.status == "FINISHED"


def test_conditional_hybrid_v_model_trains_and_packages_what_sampling_and_the_elbo_need(digits_8x8, tmp_path,
                                                                                       mlflow_uri):
    """num_classes auto (from the manifest), label dropout, v-prediction, learned variance, L_hybrid: the logged
    model carries all of it, samples a class with guidance, and its ELBO uses Σ_θ."""
    train_dir, val_dir = digits_8x8
    config = TrainConfig.model_validate({
        **TINY, "steps": 40, "eval_every": 40, "objective": "l_hybrid", "class_dropout": 0.2,
        "model": {"preset": "tiny", "num_classes": "auto", "prediction": "v", "learn_variance": True}})
    result = run_training(config, train_dir, val_dir, tmp_path / "out", mlflow_uri, "test-train", "train")
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.data.params["train.objective"] == "l_hybrid" and run.data.params["unet.num_classes"] == "10"
    assert run.data.params["train.model.prediction"] == "v" and run.data.params["unet.learn_variance"] == "True"
    for key in ("loss", "mse", "loss_vb_bpd", "val_bpd", "val_decoder_bpd"):
        assert key in run.data.metrics, key
    mlflow.set_tracking_uri(mlflow_uri)
    model = load_model(result.model_uri)
    assert model.num_classes == 10 and model.class_names == tuple(str(k) for k in range(10))
    assert model.prediction == "v" and model.learn_variance
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.metadata["class_names"][7] == "7" and info.metadata["num_classes"] == 10
    assert info.metadata["prediction"] == "v" and info.metadata["objective"] == "l_hybrid"
    described = model.describe()
    assert described["class_names"][3] == "3" and described["objective"] == "l_hybrid"
    from diffusion.samplers import sample

    y = torch.tensor([3, 7])
    images = sample(model, model.schedule(), (2, 1, 8, 8), "ddpm", 10, torch.Generator().manual_seed(0), y=y,
                    guidance_scale=2.0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    x0 = torch.zeros(2, 1, 8, 8)
    out = model.unet(x0, torch.tensor([5, 5]))
    assert out.shape == (2, 2, 8, 8)  # the prediction, then the variance values
    assert model.nll_bpd(x0)["total_bpd"].isfinite().all()


def test_l_vlb_importance_sampler_state_is_checkpointed(digits_8x8, tmp_path, mlflow_uri):
    """Every rank records every rank's (t, L_t): after 30 steps of 2 × 16 images the sampler holds 960 values."""
    from pipelines.train.checkpoint import load_state

    train_dir, _ = digits_8x8
    config = TrainConfig.model_validate({**TINY, "steps": 30, "checkpoint_every": 30, "objective": "l_vlb",
                                         "model": {"preset": "tiny", "learn_variance": True}})
    result = run_training(config, train_dir, None, tmp_path / "out", mlflow_uri, "test-train", "train")
    state = load_state(result.checkpoint_path)
    counts = state["t_sampler"]["counts"]
    assert counts.shape == (1000,) and int(counts.sum()) == 30 * 32
    assert MlflowClient(mlflow_uri).get_run(result.run_id).data.params["train.objective"] == "l_vlb"
