"""The train stage's driver side: validate, open (or reopen) the MLflow run, run the TorchTrainer, log the model.

Everything a training run keeps lives at its output URI (a local directory or a storage URI such as
`s3://bucket/prefix/stages/train-<key>`): the MLflow run id (written there at once) and Ray Train's run with its
checkpoints (`storage_path` on that filesystem, so they survive the node that wrote them). Re-running with the same
output URI resumes, on whichever node runs it: Ray Train restores its run from storage, the worker loop continues
from the latest checkpoint, and the same MLflow run is reopened and continued. Each training worker reads its
shards from the split URIs itself (localized on its own node, verified against the manifest's sha256).

In a pipeline (`KIND`) the training run is the stage's nested MLflow run; the resumed run is moved under the current
pipeline run. MLflow and Ray Train are imported where they are used, so loading the kind to validate a pipeline file
stays quick.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion.ema import EMA
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig
from pipelines.stage import StageContext, StageKind, StageResult
from pipelines.storage import Storage, filesystem, is_remote, join_uri
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
    checkpoint_path: str  # the final checkpoint's URI (a local path with local storage)
    checkpoint_hash: str  # sha256 of its state file
    final_step: int
    metrics: dict


def split_spec(split_uri: str) -> tuple[int, int, list[str] | None]:
    """(image size, channels, class names or None) of a split, from the ingest manifest at its URI."""
    from pipelines.ingest.manifest import MANIFEST

    manifest = Storage(split_uri).read_json(join_uri(split_uri, MANIFEST))
    if manifest is None:
        raise FileNotFoundError(f"training split {split_uri} has no {MANIFEST}: not an ingested split")
    if not manifest.get("num_samples"):
        raise ValueError(f"training split {split_uri} holds no images")
    image = manifest["image"]
    return int(image["size"]), int(image["channels"]), manifest.get("classes")


def open_run(client: MlflowClient, output_uri: str, experiment_id: str, run_name: str, parent_run_id: str | None,
             config, unet_config: UNetConfig, params_key: str = "train") -> str:
    """Reopen the run recorded at output_uri (a resumed training), or create one and record it there at once."""
    storage, marker = Storage(output_uri), join_uri(output_uri, RUN_ID_FILE)
    recorded = storage.read_text(marker)
    if recorded:
        run_id = recorded.strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = run_tags(cluster_workers=config.workers, use_gpu=config.use_gpu)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    params = flatten({params_key: config.model_dump(mode="json"), "unet": unet_config.to_dict()})
    for key, value in params.items():
        client.log_param(run_id, key, value)
    storage.write_text(marker, run_id)
    return run_id


def torch_trainer(config, loop_config: dict, output_uri: str, datasets: dict | None = None,
                  callbacks: list | None = None, loop=None, name: str = "train"):
    """The TorchTrainer of a run (`loop` per worker, the train loop by default), its Ray Train storage at
    `output_uri`/ray on that URI's filesystem; `config` has the train stage's scaling and checkpoint fields."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    fs, storage_path = filesystem(join_uri(output_uri, "ray"))
    return TorchTrainer(
        loop or train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker,
                                                           **config.resources_per_worker},
                                     placement_strategy=config.placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             callbacks=callbacks or None),
        datasets=datasets or {},
    )


def final_state(checkpoint, output_uri: str) -> tuple[dict, str, str]:
    """(training state, the checkpoint's URI, sha256 of its state file) of Ray Train's final checkpoint."""
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
        digest = hashlib.sha256((Path(directory) / STATE_FILE).read_bytes()).hexdigest()
    ray_path = filesystem(join_uri(output_uri, "ray"))[1]
    relative = checkpoint.path[len(ray_path):].strip("/")
    return state, join_uri(output_uri, "ray", *relative.split("/")), digest


def run_training(config: TrainConfig, train_uri: str | Path, val_uri: str | Path | None, output_uri: str | Path,
                 tracking_uri: str, experiment: str, run_name: str = "train", parent_run_id: str | None = None,
                 datasets: dict | None = None, callbacks: list | None = None) -> TrainResult:
    """Train on the split at `train_uri` with Ray Train (Ray must be initialised); returns the logged model's URI.

    URIs are local paths or storage URIs (s3://…); `output_uri` holds the run's checkpoints and MLflow run id.
    `datasets` ({"train": ray.data.Dataset}) is built from the split when the config's loader is "ray_data".
    `callbacks`: Ray Train controller callbacks (RunConfig.callbacks), e.g. Ray Tune's TuneReportCallback in a sweep.
    """
    from mlflow.tracking import MlflowClient

    train_uri, output_uri = absolute_uri(train_uri), absolute_uri(output_uri)
    val_uri = absolute_uri(val_uri) if val_uri else None
    image_size, channels, classes = split_spec(train_uri)
    unet_config = config.model.unet_config(image_size, channels, classes)
    if config.loader == "ray_data" and datasets is None:
        from pipelines.ingest.reader import ray_image_dataset

        datasets = {"train": ray_image_dataset(train_uri)}
    client = MlflowClient(tracking_uri)
    run_id = open_run(client, output_uri, ensure_experiment(tracking_uri, experiment), run_name, parent_run_id,
                       config, unet_config)
    print(f"[raydiff train] MLflow run {run_id} ({tracking_uri})", flush=True)
    # Ray Train re-emits every print of a worker through its logger, which doubles each progress line on the
    # driver; workers inherit this (Ray Train propagates RAY_TRAIN_* variables set here).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    loop_config = {"train": config.model_dump(mode="json"), "unet": unet_config.to_dict(), "mlflow_run_id": run_id,
                   "class_names": classes if unet_config.num_classes is not None else None,
                   "tracking_uri": tracking_uri, "train_uri": train_uri, "val_uri": val_uri}
    try:
        result = torch_trainer(config, loop_config, output_uri, datasets, callbacks).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training in {output_uri} finished without a checkpoint")
        state, checkpoint_uri, digest = final_state(result.checkpoint, output_uri)
        log_model(packaged_model(state, config, run_id), run_id, tracking_uri)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    metrics = client.get_run(run_id).data.metrics
    return TrainResult(model_uri=f"runs:/{run_id}/model", run_id=run_id, checkpoint_path=checkpoint_uri,
                       checkpoint_hash=digest, final_step=int(state["step"]), metrics=dict(metrics))


def absolute_uri(location: str | Path) -> str:
    """A storage URI as given, a local path made absolute (Ray workers have other working directories)."""
    return str(location) if is_remote(str(location)) else str(Path(location).resolve())


def log_model(model: DiffusionModel, run_id: str, tracking_uri: str) -> None:
    """Log the trained model to the training run as `model` (safetensors + config.json, pipelines.modelstore)."""
    import mlflow

    from pipelines.modelstore import log_model as log_packaged
    from pipelines.tracking import use_tracking_uri

    with use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        log_packaged(model)


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
    recorded = Storage(ctx.output_uri).read_text(join_uri(ctx.output_uri, RUN_ID_FILE))
    if recorded:
        ctx.mlflow().set_tag(recorded.strip(), "mlflow.parentRunId", ctx.parent_run_id)
    result = run_training(ctx.params, splits["train"], splits.get("val"), ctx.output_uri, ctx.tracking_uri,
                          ctx.experiment, run_name=ctx.stage, parent_run_id=ctx.parent_run_id)
    return StageResult(
        values={"model_uri": result.model_uri, "run_id": result.run_id, "final_step": result.final_step,
                "checkpoint": result.checkpoint_path},
        metrics={k: float(v) for k, v in result.metrics.items()},
        content_hash=result.checkpoint_hash,
        run_id=result.run_id,
    )


KIND = StageKind(name="train", params="pipelines.train.config:TrainConfig", run=run, inputs={"data": ("ingest",)},
                 version="1", resources={"num_cpus": 0}, owns_run=True)
