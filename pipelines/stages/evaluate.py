"""evaluate: bits/dim, FID per sampler and sample grids for the trained model (pipelines.evaluate); the runner's
nested run gets its metrics, table and artifacts."""

from __future__ import annotations

from pipelines.stages.kind import StageContext, StageKind, StageResult, use_tracking_uri


def run(ctx: StageContext) -> StageResult:
    import mlflow.pytorch
    import torch

    from pipelines.evaluate.stage import run_evaluate
    from pipelines.ingest.reader import load_split_tensor

    splits = ctx.inputs["data"].values["splits"]
    if "test" not in splits:
        raise ValueError(f"evaluate needs a 'test' split; the ingest stage produced {sorted(splits)}")
    model_uri = ctx.inputs["model"].values["model_uri"]
    test_images, _ = load_split_tensor(ctx.localize(splits["test"]))
    train_images, train_labels = load_split_tensor(ctx.localize(splits["train"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_tracking_uri(ctx.tracking_uri):
        model = mlflow.pytorch.load_model(model_uri, map_location=device).to(device)
    result = run_evaluate(ctx.params, model, test_images, train_images, train_labels, ctx.output_dir, progress=False)
    ctx.log_artifacts(result.artifacts)
    ctx.mlflow().log_dict(ctx.run_id, result.table, "sampler_table.json")
    samples = sorted(p for p in result.artifacts if p.name.startswith("samples_"))
    return StageResult(
        values={"metrics": result.metrics, "model_uri": model_uri, "samples_dir": ctx.output_uri,
                "samples": [ctx.uri_of(p) for p in samples]},
        metrics=result.metrics,
    )


KIND = StageKind(name="evaluate", params="pipelines.evaluate.config:EvaluateConfig", run=run,
                 inputs={"model": ("train",), "data": ("ingest",)}, code=("pipelines.evaluate", "diffusion"),
                 resources={"num_cpus": 1})
