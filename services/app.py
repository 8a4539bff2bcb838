"""The Ray Serve application: the HTTP `Ingress` (services.ingress) in front of `SamplerDeployment`
(services.replica, the model and its continuous batching).

Built by `build_app(args)` (what `serve run`/`serve deploy` import: `services.app:build_app`); `args` are
`AppArgs`. The model is loaded from MLflow when a SamplerDeployment replica starts, so a redeploy of
`models:/NAME@champion` serves whatever is champion then; Serve's rolling update lets old replicas finish their
in-flight requests first (graceful_shutdown_timeout_s = request_timeout_s), and the ingress retries a request
whose replica died (the seed is fixed before the first try, so a retry returns the same images).
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from services.args import AppArgs
from services.ingress import Ingress
from services.replica import SamplerDeployment


def replica_gpus(args: AppArgs) -> float:
    """GPUs each SamplerDeployment replica reserves: `num_gpus` as given, 1 for device "cuda" without it. Decided by
    the arguments alone, never by the cluster's current size (which reads 0 while GPU nodes scale from zero)."""
    if args.device == "cpu":
        return 0.0
    return args.num_gpus or (1.0 if args.device == "cuda" else 0.0)


def build_app(args: dict) -> serve.Application:
    """`services.app:build_app` — the two deployments bound to `AppArgs(**args)`."""
    a = AppArgs.model_validate(args)
    if a.tracking_uri and a.tracking_uri.startswith("sqlite:///") and not a.tracking_uri[10:].startswith("/"):
        # a relative sqlite path (configs/serve-local.yaml) means relative to where the app is built; replicas
        # run in other working directories
        a = a.model_copy(update={"tracking_uri": "sqlite:///" + os.path.abspath(a.tracking_uri[10:])})
    scaling: dict[str, Any] = (
        {"num_replicas": a.min_replicas} if a.min_replicas == a.max_replicas and a.min_replicas > 0 else
        {"autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                "target_ongoing_requests": a.max_batch_size}})
    sampler = SamplerDeployment.options(
        max_ongoing_requests=2 * a.max_batch_size,  # ≥ max_batch_size so batches fill, plus one batch queued
        graceful_shutdown_timeout_s=a.request_timeout_s,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": replica_gpus(a)},
        **scaling,
    ).bind(a.model_dump())
    return Ingress.options(
        num_replicas=a.ingress_replicas,
        max_ongoing_requests=max(128, 4 * a.max_batch_size),
        ray_actor_options={"num_cpus": 0.5},
    ).bind(sampler, a.model_dump())

