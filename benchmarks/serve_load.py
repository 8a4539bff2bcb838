"""Serving under load: N concurrent HTTP clients against the Ray Serve app vs in-process batched sampling.

Both sides use the same model (the `small` preset unless --model-uri is given), sampler, steps and images per
request, and the same torch thread count for the model. Rows:

1. images/s: N concurrent loopback HTTP clients (bounded by --duration and --max-requests each) vs one process
   calling `services.engine.Engine.sample` on a full batch (max_batch_size requests × images each); the two are
   measured in alternating rounds and compared by their medians. Target ≥ 0.8× at 16 clients.
2. p50 / p95 request latency vs the in-process time of one full batch (the least a batched request can take).
3. errors (non-200 or dropped connections): target 0.
4. the model call size (images per step, from the replica's counters) under load vs the full batch.

On a small CPU host the HTTP stack (proxy, ingress, the clients themselves) competes with the model for cores, so
few cheap steps per request (e.g. --samplers ddim-10) measure mostly that overhead.

    python -m benchmarks.serve_load [--quick] [--json PATH] [--clients 16] [--model-uri URI --tracking-uri URI]
        [--samplers ddim-50 dpmpp-2m-20 ode-heun-18 ...]

With several `--samplers` (NAME-STEPS, any registered sampler) client k sends the k-th one (cyclically), and the
in-process baseline batches the same mix: requests of different samplers and step counts share every model call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from benchmarks.report import Row, emit
from diffusion.sampler_specs import SAMPLER_NAMES, sampler_spec
from services.engine import Engine, SampleJob


def parse_sampler(text: str) -> tuple[str, int]:
    """'dpmpp-2m-20' → ("dpmpp-2m", 20): the steps follow the last hyphen."""
    name, _, steps = text.rpartition("-")
    sampler_spec(name)
    if not steps.isdigit():
        raise SystemExit(f"--samplers {text!r}: expected NAME-STEPS, e.g. ddim-50")
    return name, int(steps)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_model(tmp: Path, preset: str) -> tuple[str, str]:
    """An (untrained: throughput does not depend on the weights) DiffusionModel registered as bench@champion."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from diffusion.packaged import DiffusionModel
    from diffusion.unet import UNet, UNetConfig
    from pipelines.modelstore import log_model

    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-load", artifact_location=(tmp / "mlartifacts").as_uri())
    torch.manual_seed(0)
    model = DiffusionModel(UNet(UNetConfig.preset(preset)), "linear", 1000, metadata={"preset": preset})
    with mlflow.start_run(experiment_id=exp) as run:
        model.metadata["training_run_id"] = run.info.run_id
        log_model(model)
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "bench").version
    client.set_registered_model_alias("bench", "champion", version)
    return "models:/bench@champion", uri


def in_process_rate(engine: Engine, mix: list[SampleJob], batch_requests: int,
                    seconds: float) -> tuple[float, float]:
    """(images/s, seconds per full batch) of `batch_requests` requests, the k-th a copy of mix[k % len(mix)], sampled
    as one batch."""
    jobs = [SampleJob(**{**mix[k % len(mix)].__dict__, "seed": k}) for k in range(batch_requests)]
    engine.sample(jobs)  # warm-up
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 2:
        t0 = time.perf_counter()
        engine.sample(jobs)
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    return sum(job.num_images for job in jobs) / per_batch, per_batch


def http_load(url: str, bodies: list[dict], clients: int, duration: float, max_requests: int) -> dict:
    """`clients` threads, each with its own connection, client k posting bodies[k % len(bodies)] back to back until
    `duration` seconds or `max_requests` requests. → images/s, latencies, status counts, batch sizes."""
    assert url.startswith(("http://127.0.0.1:", "http://localhost:")), "the load test stays on loopback"
    stop_at = time.perf_counter() + duration
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    batch_sizes: list[int] = []
    images = 0

    def client(k: int) -> None:
        nonlocal images
        session = requests.Session()
        for i in range(max_requests):
            if time.perf_counter() >= stop_at:
                return
            t0 = time.perf_counter()
            try:
                r = session.post(url + "v1/samples", json={**bodies[k % len(bodies)], "seed": k * 1_000_000 + i},
                                 timeout=300)
                status, payload = r.status_code, (r.json() if r.status_code == 200 else None)
            except requests.RequestException as error:
                status, payload = type(error).__name__, None
            with lock:
                statuses[status] += 1
                if payload is not None:
                    latencies.append(time.perf_counter() - t0)
                    images += payload["shape"][0]
                    batch_sizes.append(payload["timing"]["batch_requests"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    return {"images_per_s": images / wall, "p50": pick(0.50), "p95": pick(0.95), "statuses": statuses,
            "requests": sum(statuses.values()), "errors": sum(v for k, v in statuses.items() if k != 200),
            "mean_batch": statistics.mean(batch_sizes) if batch_sizes else 0.0, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~1 minute")
    parser.add_argument("--json", default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=None, help="seconds of HTTP load per round (default 20, "
                                                                     "quick 10)")
    parser.add_argument("--max-requests", type=int, default=1000, help="per client")
    parser.add_argument("--samplers", nargs="+", default=["ddim-50"], metavar="NAME-STEPS",
                        help=f"registered samplers with steps ({', '.join(SAMPLER_NAMES)}); several: a mixed load")
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the model on both sides (default: half the cores, at least 1)")
    parser.add_argument("--preset", default="small", help="U-Net preset of the generated model")
    parser.add_argument("--model-uri", default=None, help="serve this model instead (needs --tracking-uri)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    mix = [parse_sampler(text) for text in args.samplers]
    rounds = 2 if args.quick else 4
    load_s = args.duration or (10.0 if args.quick else 20.0)
    baseline_s = 3.0 if args.quick else 6.0
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)

    import ray
    from ray import serve

    from services.deploy import deploy
    from services.engine import resolve_device
    from services.loading import load

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    if args.model_uri:
        model_uri, tracking_uri = args.model_uri, args.tracking_uri
    else:
        model_uri, tracking_uri = register_model(tmp, args.preset)
    device = resolve_device(args.device)
    torch.set_num_threads(threads)
    model, ref = load(model_uri, tracking_uri, device)
    engine = Engine(model, device)
    jobs = [SampleJob(name, steps, args.images_per_request, seed=0) for name, steps in mix]

    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=max(4, os.cpu_count() or 1))
    baselines, batch_times, loads, ticks = [], [], [], []
    try:
        url = deploy(model_uri, tracking_uri, port=free_port(), max_batch_size=args.max_batch_size, name="serve-load",
                     device=args.device, torch_threads=threads, request_timeout_s=300,
                     max_num_images=max(64, args.images_per_request))
        sampler = serve.get_deployment_handle("SamplerDeployment", "serve-load")
        bodies = [{"sampler": name, "steps": steps, "num_images": args.images_per_request, "format": "png"}
                  for name, steps in mix]
        http_load(url, bodies, args.clients, 2.0, 2)  # warm-up: replica, connections, respaced schedules
        engine.sample(jobs)
        for _ in range(rounds):  # A B A B …: a busy machine slows both sides alike
            rate, per_batch = in_process_rate(engine, jobs, args.max_batch_size, baseline_s)
            baselines.append(rate)
            batch_times.append(per_batch)
            before = sampler.stats.remote().result()
            loads.append(http_load(url, bodies, args.clients, load_s, args.max_requests))
            after = sampler.stats.remote().result()
            ticks.append({k: after[k] - before[k] for k in before})
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    served_rate = statistics.median(r["images_per_s"] for r in loads)
    baseline = statistics.median(baselines)
    batch_time = statistics.median(batch_times)
    latencies = {q: statistics.median(r[q] for r in loads) for q in ("p50", "p95")}
    errors, requests_ = sum(r["errors"] for r in loads), sum(r["requests"] for r in loads)
    tick_images = sum(t["tick_images"] for t in ticks) / max(1, sum(t["ticks"] for t in ticks))
    busy = sum(t["busy_s"] for t in ticks) / sum(t["uptime_s"] for t in ticks)
    what = f"{' + '.join(args.samplers)}, {args.images_per_request} img/req, {args.clients} clients"
    rows = [
        Row(f"serve img/s ({what})", served_rate, baseline, "img/s", "≥ 0.8×"),
        Row("serve p50 latency vs in-process full batch", latencies["p50"] * 1e3, batch_time * 1e3, "ms", "-", True),
        Row("serve p95 latency vs in-process full batch", latencies["p95"] * 1e3, batch_time * 1e3, "ms", "-", True),
        Row(f"errors ({requests_} requests)", errors, None, "count", "0"),
        Row("model call size under load vs full batch", tick_images, args.max_batch_size * args.images_per_request,
            "images", "-"),
    ]
    print(f"model {ref.loaded_uri} ({args.preset if not args.model_uri else ref.name}) on {device}, {threads} torch "
          f"thread(s) each side, {rounds} interleaved rounds; in-process img/s per round "
          f"{[round(b, 1) for b in baselines]}, serve img/s per round {[round(r['images_per_s'], 1) for r in loads]}; "
          f"model busy {busy:.0%} of the serve load time; HTTP statuses "
          f"{dict(sum((r['statuses'] for r in loads), Counter()))}")
    emit(rows, args.json, "Ray Serve sampling under load vs in-process batched sampling")
    return 0 if errors == 0 and served_rate >= 0.8 * baseline else 1


if __name__ == "__main__":
    raise SystemExit(main())
