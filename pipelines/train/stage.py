"""The train stage's driver side: validate, open (or reopen) the MLflow run, run the TorchTrainer, log the model.

Re-running with the same `output_dir` resumes: Ray Train restores the run stored under `output_dir/ray/train`
(same storage path and name), the worker loop continues from its latest checkpoint, and the same MLflow run
is reopened and continued.

In a pipeline (`KIND`) the training run is the stage's nested MLflow run. A rerun with the same cache key gets the
same output directory, where run_training finds its checkpoints and its MLflow run and resumes both; the resumed
run is moved under the current pipeline run. MLflow and Ray Train are imported where they are used, so loading the
kind to validate a pipeline file stays quick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion.ema import EMA
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig
from pipelines.hashing import hash_files
from pipelines.stage import StageContext, StageKind, StageResult
from pipelines.tracking import ensure_experiment, flatten, run_tags
from pipelines.train.checkpoint import STATE_FILE, load_state
from pipelines.train.config import TrainConfig

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

RUN_ID_FILE = "mlflow_run_id.txt"


@dataclass(frozen=True)
class TrainResult:
    model_uri: str
    run_id: str
    checkpoint_path: str
    final_step: int
    metrics: dict


def image_spec(train_dir: Path) -> tuple[int, int]:
    """(image size, channels) of the shards in `train_dir`, read from one decoded sample."""
    from pipelines.ingest.reader import load_split_tensor

    images, _ = load_split_tensor(train_dir, limit=1)
    if images.shape[0] == 0:
        raise ValueError(f"training split {train_dir} holds no images")
    _, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"training images in {train_dir} are {height}x{width}; the U-Net needs square images")
    return height, channels


def split_classes(split_dir: Path) -> list[str] | None:
    """Class names indexed by label, as the split's ingest manifest records them (None when the source has none)."""
    from pipelines.ingest.manifest import load_manifest

    return load_manifest(split_dir).get("classes")


def _open_run(client: MlflowClient, output_dir: Path, experiment_id: str, run_name: str, parent_run_id: str | None,
              config: TrainConfig, unet_config: UNetConfig) -> str:
    """Reopen the run recorded in output_dir (a resumed training), or create and record a new one."""
    marker = output_dir / RUN_ID_FILE
    if marker.is_file():
        run_id = marker.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = run_tags(cluster_workers=config.workers, use_gpu=config.use_gpu)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    params = flatten({"train": config.model_dump(mode="json"), "unet": unet_config.to_dict()})
    for key, value in params.items():
        client.log_param(run_id, key, value)
    marker.write_text(run_id)
    return run_id


def run_training(config: TrainConfig, train_dir: Path, val_dir: Path | None, output_dir: Path, tracking_uri: str,
                 experiment: str, run_name: str = "train", parent_run_id: str | None = None,
                 datasets: dict | None = None, callbacks: list | None = None) -> TrainResult:
    """Train on the shards in `train_dir` with Ray Train (Ray must be initialised); returns the logged model's URI.

    `datasets` ({"train": ray.data.Dataset}) is built from train_dir when the config's loader is "ray_data".
    `callbacks`: Ray Train controller callbacks (RunConfig.callbacks), e.g. Ray Tune's TuneReportCallback in a sweep.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    image_size, channels = image_spec(Path(train_dir))
    classes = split_classes(Path(train_dir))
    unet_config = config.model.unet_config(image_size, channels, classes)
    if config.loader == "ray_data" and datasets is None:
        from pipelines.ingest.reader import ray_image_dataset

        datasets = {"train": ray_image_dataset(train_dir)}
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    run_id = _open_run(client, output_dir, experiment_id, run_name, parent_run_id, config, unet_config)
    print(f"[raydiff train] MLflow run {run_id} ({tracking_uri})", flush=True)

    # Ray Train re-emits every print of a worker through its logger, which doubles each progress line on the
    # driver; workers inherit this (Ray Train propagates RAY_TRAIN_* variables set here).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": config.model_dump(mode="json"), "unet": unet_config.to_dict(), "mlflow_run_id": run_id,
            "class_names": classes if unet_config.num_classes is not None else None,
            "tracking_uri": tracking_uri, "train_dir": str(Path(train_dir).resolve()),
            "val_dir": str(Path(val_dir).resolve()) if val_dir else None,
        },
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker},
                                     placement_strategy=config.placement_strategy),
        run_config=RunConfig(name="train", storage_path=str(output_dir / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             callbacks=callbacks or None),
        datasets=datasets or {},
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training in {output_dir} finished without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            state = load_state(directory)
        model = packaged_model(state, config, run_id)
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            described = model.describe()  # classes, prediction type, schedule: readable without loading the model
            mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", metadata={
                key: described[key] for key in ("num_classes", "class_names", "prediction", "learn_variance",
                                                "schedule", "num_timesteps", "zero_terminal_snr", "objective")})
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    metrics = client.get_run(run_id).data.metrics
    return TrainResult(model_uri=f"runs:/{run_id}/model", run_id=run_id, checkpoint_path=result.checkpoint.path,
                       final_step=int(state["step"]), metrics=dict(metrics))


def packaged_model(state: dict, config: TrainConfig, run_id: str) -> DiffusionModel:
    """The EMA weights of a training checkpoint as a DiffusionModel (the object logged to MLflow)."""
    unet_config = UNetConfig.from_dict(state["unet_config"])
    ema = EMA(UNet(unet_config))
    ema.load_state_dict(state["ema"])
    class_names = state.get("class_names")
    if unet_config.num_classes is not None and (class_names is None or len(class_names) != unet_config.num_classes):
        class_names = [str(k) for k in range(unet_config.num_classes)]  # a count given without manifest names
    return DiffusionModel(ema.averaged, config.schedule.name, config.schedule.num_timesteps,
                          metadata={"training_run_id": run_id, "training_steps": int(state["step"]),
                                    "objective": config.objective},
                          prediction=config.model.prediction, zero_terminal_snr=config.schedule.zero_terminal_snr,
                          class_names=class_names if unet_config.num_classes is not None else None).eval()


def run(ctx: StageContext) -> StageResult:
    splits = ctx.inputs["data"].values["splits"]
    marker = ctx.output_dir / RUN_ID_FILE
    if marker.is_file():
        ctx.mlflow().set_tag(marker.read_text().strip(), "mlflow.parentRunId", ctx.parent_run_id)
    result = run_training(ctx.params, ctx.localize(splits["train"]),
                          ctx.localize(splits["val"]) if "val" in splits else None, ctx.output_dir,
                          ctx.tracking_uri, ctx.experiment, run_name=ctx.stage, parent_run_id=ctx.parent_run_id)
    checkpoint = Path(result.checkpoint_path)
    return StageResult(
        values={"model_uri": result.model_uri, "run_id": result.run_id, "final_step": result.final_step,
                "checkpoint": ctx.uri_of(checkpoint)},
        metrics={k: float(v) for k, v in result.metrics.items()},
        content_hash=hash_files([checkpoint / STATE_FILE]),
        run_id=result.run_id,
    )


KIND = StageKind(name="train", params="pipelines.train.config:TrainConfig", run=run, inputs={"data": ("ingest",)},
                 version="1", resources={"num_cpus": 0}, owns_run=True)
