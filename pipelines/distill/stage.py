"""The distill stage's driver side: open (or reopen) the MLflow run, run the distillation with Ray Train, log the
student in the project's model format.

Like the train stage, everything a run keeps lives at its output URI (the MLflow run id, Ray Train's run and
checkpoints), so re-running resumes: the round and step of the latest checkpoint, the same MLflow run. The student's
metadata says it is distilled, from which teacher, by which method and for how many steps; it samples with the
`distilled` sampler at those steps (guidance, if distilled in, needs no guidance scale).
"""

from __future__ import annotations

import os

from diffusion.ema import EMA
from diffusion.packaged import DiffusionModel
from diffusion.unet import UNet, UNetConfig
from pipelines.distill.config import DistillConfig
from pipelines.stage import StageContext, StageKind, StageResult
from pipelines.storage import Storage, join_uri
from pipelines.tracking import ensure_experiment, use_tracking_uri
from pipelines.train.stage import RUN_ID_FILE, absolute_uri, final_state, log_model, open_run, torch_trainer


def student_model(state: dict, teacher: DiffusionModel, config: DistillConfig, teacher_uri: str,
                  run_id: str) -> DiffusionModel:
    """The final round's EMA student as a DiffusionModel with its provenance."""
    ema = EMA(UNet(UNetConfig.from_dict(teacher.unet.config.to_dict())))
    ema.load_state_dict(state["ema"])
    steps = config.rounds[-1]
    metadata = {"distilled": True, "distill_method": config.method, "teacher": teacher_uri,
                "teacher_run_id": teacher.metadata.get("training_run_id"), "distilled_steps": steps,
                "sampler": "distilled", "distilled_guidance_scale": config.guidance_scale,
                "training_run_id": run_id}
    return DiffusionModel(ema.averaged, teacher.schedule_name, teacher.num_timesteps, metadata=metadata,
                          prediction="v", zero_terminal_snr=teacher.zero_terminal_snr,
                          class_names=teacher.class_names).eval()


def run_distillation(config: DistillConfig, teacher_uri: str, train_uri: str, output_uri: str, tracking_uri: str,
                     experiment: str, run_name: str = "distill", parent_run_id: str | None = None,
                     test_uri: str | None = None) -> dict:
    """Distil the model at `teacher_uri` on the split at `train_uri` (Ray must be initialised), scoring each round's
    student against the split at `test_uri` when given; → the stage values."""
    from mlflow.tracking import MlflowClient

    from pipelines.distill.loop import distill_loop_per_worker
    from pipelines.modelstore import load_model

    train_uri, output_uri = absolute_uri(train_uri), absolute_uri(output_uri)
    with use_tracking_uri(tracking_uri):
        teacher = load_model(teacher_uri)
    if config.teacher_steps > teacher.num_timesteps:
        raise ValueError(f"distill.teacher_steps {config.teacher_steps} exceeds the teacher's "
                         f"{teacher.num_timesteps}-step schedule")
    client = MlflowClient(tracking_uri)
    run_id = open_run(client, output_uri, ensure_experiment(tracking_uri, experiment), run_name, parent_run_id,
                      config, teacher.unet.config, params_key="distill")
    print(f"[raydiff distill] MLflow run {run_id} ({tracking_uri}): {teacher_uri}, {config.teacher_steps} DDIM steps "
          f"→ {' → '.join(str(n) for n in config.rounds)}", flush=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    loop_config = {"distill": config.model_dump(mode="json"), "teacher_uri": teacher_uri, "train_uri": train_uri,
                   "test_uri": absolute_uri(test_uri) if test_uri else None, "tracking_uri": tracking_uri,
                   "mlflow_run_id": run_id}
    try:
        result = torch_trainer(config, loop_config, output_uri, loop=distill_loop_per_worker, name="distill").fit()
        if result.checkpoint is None:
            raise RuntimeError(f"distillation in {output_uri} finished without a checkpoint")
        state, checkpoint_uri, digest = final_state(result.checkpoint, output_uri)
        log_model(student_model(state, teacher, config, teacher_uri, run_id), run_id, tracking_uri)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return {"model_uri": f"runs:/{run_id}/model", "run_id": run_id, "steps": config.rounds[-1],
            "teacher_uri": teacher_uri, "checkpoint": checkpoint_uri, "checkpoint_hash": digest,
            "metrics": dict(client.get_run(run_id).data.metrics)}


def run(ctx: StageContext) -> StageResult:
    splits = ctx.inputs["data"].values["splits"]
    recorded = Storage(ctx.output_uri).read_text(join_uri(ctx.output_uri, RUN_ID_FILE))
    if recorded:
        ctx.mlflow().set_tag(recorded.strip(), "mlflow.parentRunId", ctx.parent_run_id)
    values = run_distillation(ctx.params, ctx.inputs["model"].values["model_uri"], splits["train"], ctx.output_uri,
                              ctx.tracking_uri, ctx.experiment, run_name=ctx.stage, parent_run_id=ctx.parent_run_id,
                              test_uri=splits.get("test"))
    metrics, digest = values.pop("metrics"), values.pop("checkpoint_hash")
    return StageResult(values=values, metrics={k: float(v) for k, v in metrics.items()}, content_hash=digest,
                       run_id=values["run_id"])


KIND = StageKind(name="distill", params="pipelines.distill.config:DistillConfig", run=run,
                 inputs={"model": ("train", "sweep"), "data": ("ingest",)}, version="1", resources={"num_cpus": 0},
                 owns_run=True)
