"""deploy: build the Serve application named by `app` for the model and run it on the current Ray cluster.

Fed by a register stage it serves a concrete registry version: the champion as of that registration
(`model: champion`, the default) or the version just registered (`model: registered`); fed by a train stage
directly it serves that run's model. A cache hit re-deploys only when the application is not running (a fresh
local Ray instance after `raydiff run` ended, say). The application is imported by path, so the pipeline never
imports the serving code itself.
"""

from __future__ import annotations

import importlib

from pipelines.deploy.config import DeployConfig
from pipelines.stage import StageContext, StageKind, StageRecord, StageResult


def model_uri_to_serve(ctx: StageContext) -> str:
    upstream = ctx.inputs["model"]
    if upstream.kind in ("train", "sweep"):  # a sweep's values are its best trial's, as a train stage's
        return upstream.values["model_uri"]
    values = upstream.values
    version = values["champion_version"] if ctx.params.model == "champion" else values["version"]
    if not version:
        raise ValueError(f"model {values['name']!r} has no {values['alias']!r} version to deploy "
                         f"(version {values['version']} was not promoted); set model: registered to serve it anyway")
    return f"models:/{values['name']}/{version}"


def endpoint_url(params: DeployConfig) -> str:
    """The URL clients use; a wildcard bind address is reached through loopback."""
    host = "127.0.0.1" if params.host in ("0.0.0.0", "::", "") else params.host
    return f"http://{host}:{params.port}{params.route}"


def _deploy(ctx: StageContext, model_uri: str) -> str:
    """Build the application, start Serve's HTTP proxy on host:port (if Serve already runs, its HTTP options stay as
    they are) and deploy the application, or update it in place. Returns the endpoint URL."""
    from ray import serve

    from pipelines.resources import wait_for_resources

    params: DeployConfig = ctx.params
    gpus = params.replica_gpus()
    if gpus:
        wait_for_resources({"GPU": gpus * params.replicas}, params.resource_wait_s, f"stages.{ctx.stage}")
    module_name, _, attr = params.app.partition(":")
    build = getattr(importlib.import_module(module_name), attr)
    app = build({"model_uri": model_uri, "tracking_uri": ctx.tracking_uri,
                 "max_batch_size": params.max_batch_size, "min_replicas": params.replicas,
                 "max_replicas": params.replicas, "device": params.device, "num_gpus": gpus,
                 "num_cpus": params.num_cpus})
    serve.start(http_options={"host": params.host, "port": params.port})
    serve.run(app, name=params.name, route_prefix=params.route, blocking=False)
    return endpoint_url(params)


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


KIND = StageKind(name="deploy", params="pipelines.deploy.config:DeployConfig", run=run,
                 inputs={"model": ("register", "train", "sweep")}, version="1", resources={"num_cpus": 0},
                 restore=restore)
