"""register: a new MLflow Model Registry version of the trained model; the alias (`champion`) moves to it only if
its evaluation metric beats the alias's current version (pipelines.register.registry)."""

from __future__ import annotations

from pipelines.register.config import RegisterConfig
from pipelines.stage import StageContext, StageKind, StageResult


def run(ctx: StageContext) -> StageResult:
    from pipelines.register.registry import register_model

    params: RegisterConfig = ctx.params
    metrics = ctx.inputs["evaluation"].values["metrics"]
    metric = params.promote_if.metric
    if metric not in metrics:
        raise ValueError(f"promote_if.metric {metric!r} is not among the evaluation metrics {sorted(metrics)}")
    model = ctx.inputs["model"].values
    registration = register_model(ctx.tracking_uri, model["model_uri"], params.model_name, metric,
                                  float(metrics[metric]), params.promote_if.mode, params.alias,
                                  tags={**params.tags, "raydiff.training_run_id": model["run_id"],
                                        "raydiff.pipeline_run_id": ctx.parent_run_id})
    client = ctx.mlflow()
    client.set_tag(ctx.run_id, "raydiff.model_version", registration.model_uri)
    client.set_tag(ctx.run_id, "raydiff.promoted", str(registration.promoted).lower())
    return StageResult(values=registration.to_json(),
                       metrics={metric: registration.value, "promoted": float(registration.promoted),
                                "version": float(registration.version)})


KIND = StageKind(name="register", params="pipelines.register.config:RegisterConfig", run=run,
                 inputs={"model": ("train", "sweep", "distill"), "evaluation": ("evaluate",)}, version="1",
                 resources={"num_cpus": 0})
