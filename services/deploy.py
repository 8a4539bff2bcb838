"""Run the serving application on the current Ray instance (the pipeline's deploy stage and `raydiff serve`)."""

from __future__ import annotations

from ray import serve

from services.app import build_app
from services.args import AppArgs


def endpoint_url(host: str, port: int, route_prefix: str = "/") -> str:
    """The URL clients use; a wildcard bind address is reached through loopback."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}{route_prefix if route_prefix.startswith('/') else '/' + route_prefix}"


def deploy(model_uri: str, tracking_uri: str | None, route_prefix: str = "/", host: str = "127.0.0.1",
           port: int = 8000, replicas: int = 1, max_batch_size: int = 16, name: str = "raydiff",
           blocking: bool = False, **app_args) -> str:
    """Start Serve (HTTP on host:port) on the Ray instance this process is connected to — `ray.init` must have
    run — and deploy (or redeploy, with a rolling update) application `name`. Returns the endpoint URL.

    Extra keyword arguments are further `AppArgs` (device, max_num_images, request_timeout_s, ...). If Serve is
    already running, its HTTP options stay as they are (Ray Serve cannot change them without a restart).
    """
    args = AppArgs(model_uri=model_uri, tracking_uri=tracking_uri, max_batch_size=max_batch_size,
                   min_replicas=replicas, max_replicas=replicas, **app_args)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args.model_dump()), name=name, route_prefix=route_prefix, blocking=blocking)
    return endpoint_url(host, port, route_prefix)
