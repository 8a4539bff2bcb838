"""train: Ray Train on the ingest stage's shards (pipelines.train). Its MLflow run is the stage's nested run.

A rerun with the same cache key gets the same output directory, where run_training finds its checkpoints and
its MLflow run and resumes both; the resumed run is moved under the current pipeline run.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.stages.kind import StageContext, StageKind, StageResult, hash_files


def run(ctx: StageContext) -> StageResult:
    from pipelines.train.checkpoint import STATE_FILE
    from pipelines.train.stage import RUN_ID_FILE, run_training

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
                 code=("pipelines.train", "diffusion"), resources={"num_cpus": 0}, owns_run=True)
