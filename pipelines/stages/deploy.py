"""deploy: serve the model with Ray Serve (services.deploy) on the current Ray cluster.

Fed by a register stage it serves a concrete registry version: the champion as of that registration
(`model: champion`, the default) or the version just registered (`model: registered`); fed by a train stage
directly it serves that run's model. A cache hit re-deploys only when the application is not running (a fresh
local Ray instance after `raydiff run` ended, say).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.stages.kind import StageContext, StageKind, StageRecord, StageResult


class DeployConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Literal["champion", "registered"] = "champion"
    route: str = Field("/", pattern=r"^/")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(16, ge=1)
    name: str = Field("raydiff", min_length=1)


def model_uri_to_serve(ctx: StageContext) -> str:
    upstream = ctx.inputs["model"]
    if upstream.kind == "train":
        return upstream.values["model_uri"]
    values = upstream.values
    version = values["champion_version"] if ctx.params.model == "champion" else values["version"]
    if not version:
        raise ValueError(f"model {values['name']!r} has no {values['alias']!r} version to deploy "
                         f"(version {values['version']} was not promoted); set model: registered to serve it anyway")
    return f"models:/{values['name']}/{version}"


def _deploy(ctx: StageContext, model_uri: str) -> str:
    from services.deploy import deploy

    p: DeployConfig = ctx.params
    return deploy(model_uri, ctx.tracking_uri, route_prefix=p.route, host=p.host, port=p.port, replicas=p.replicas,
                  max_batch_size=p.max_batch_size, name=p.name, blocking=False)


def run(ctx: StageContext) -> StageResult:
    model_uri = model_uri_to_serve(ctx)
    url = _deploy(ctx, model_uri)
    ctx.mlflow().set_tag(ctx.run_id, "raydiff.endpoint", url)
    return StageResult(values={"url": url, "model_uri": model_uri, "app": ctx.params.name})


def restore(ctx: StageContext, record: StageRecord) -> StageRecord:
    from ray import serve

    app = serve.status().applications.get(record.values["app"])
    if app is not None and str(app.status) in ("RUNNING", "ApplicationStatus.RUNNING"):
        return record
    record.values["url"] = _deploy(ctx, record.values["model_uri"])
    return record


KIND = StageKind(name="deploy", params="pipelines.stages.deploy:DeployConfig", run=run,
                 inputs={"model": ("register", "train")}, code=("services",), resources={"num_cpus": 0},
                 restore=restore)
