"""ingest: source images → webdataset shards per split (pipelines.ingest), published as split-directory URIs."""

from __future__ import annotations

from pipelines.stages.kind import StageContext, StageKind, StageResult, hash_files


def run(ctx: StageContext) -> StageResult:
    from pipelines.ingest.stage import run_ingest

    result = run_ingest(ctx.params, ctx.output_dir, progress=False)
    splits = dict(sorted(result.splits.items()))
    manifests = [splits[name] / "manifest.json" for name in splits]
    for name, manifest in zip(splits, manifests):
        ctx.log_artifacts([manifest], f"manifests/{name}")
    return StageResult(
        values={"splits": {name: ctx.uri_of(path) for name, path in splits.items()},
                "num_samples": dict(result.num_samples), "fingerprint": result.fingerprint},
        metrics={f"num_samples_{name}": float(n) for name, n in result.num_samples.items()},
        content_hash=hash_files(manifests),  # manifests hold every shard's sha256
    )


KIND = StageKind(name="ingest", params="pipelines.ingest.config:IngestConfig", run=run, code=("pipelines.ingest",),
                 resources={"num_cpus": 0})
