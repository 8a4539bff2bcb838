"""`raydiff serve` and `raydiff sample`, added to the raydiff CLI by `add_commands(subparsers)`.

    raydiff serve --model-uri models:/digits@champion --tracking-uri sqlite:///mlruns.db --port 8000
    raydiff sample --url http://127.0.0.1:8000 --sampler ddim --steps 50 -n 16 -o grid.png
    raydiff sample --class 7 --guidance 3 -n 16 -o sevens.png          # a class-conditional model

Also runnable alone: `python -m services.client_cli serve ...`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from diffusion.sampler_specs import SAMPLER_NAMES


def stop_on_signals(received: list[int]) -> None:
    """The first SIGINT or SIGTERM raises KeyboardInterrupt in the main thread and is appended to `received`, also
    when started in the background (where SIGINT may be ignored) and in place of Ray's SIGTERM handler (an exit with
    a native stack dump); later ones are ignored, so the shutdown the first one started ends cleanly."""

    def stop(signum: int, frame) -> None:
        if not received:
            received.append(signum)
            raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then shut Serve and Ray down and exit 0."""
    import ray
    from ray import serve

    from services.deploy import deploy

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # build_app makes sqlite paths absolute
    received: list[int] = []
    stop_on_signals(received)
    try:
        ray.init(address=args.address, include_dashboard=False,
                 **({"num_cpus": args.num_cpus} if args.num_cpus else {}))
        stop_on_signals(received)  # ray.init replaced the SIGTERM handler
        extra = {"device": args.device, "max_num_images": args.max_num_images,
                 "request_timeout_s": args.request_timeout}
        url = deploy(args.model_uri, tracking_uri, route_prefix=args.route_prefix, host=args.host, port=args.port,
                     replicas=args.replicas, max_batch_size=args.max_batch_size, name=args.name, **extra)
        print(f"[raydiff] serving {args.model_uri} at {url}", flush=True)
        print(f"[raydiff] API docs {url.rstrip('/')}/docs   (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"[raydiff] {signal.Signals(received[0] if received else signal.SIGINT).name}: stopping", flush=True)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return 0


def class_labels(values: list[str] | None) -> list[int | str] | None:
    """`--class` values (repeated and/or comma lists) → request labels: digits are class indices, anything else a
    class name; None when not given."""
    if not values:
        return None
    labels = [token.strip() for value in values for token in value.split(",") if token.strip()]
    return [int(token) if token.isdecimal() else token for token in labels] or None


def cmd_sample(args: argparse.Namespace) -> int:
    from services.client import APIError, SamplerClient

    client = SamplerClient(args.url, timeout=args.timeout)
    try:
        result = client.samples(sampler=args.sampler, steps=args.steps, num_images=args.num_images, seed=args.seed,
                                eta=args.eta, format="grid" if args.output.endswith(".png") else "npy",
                                clip_denoised=not args.no_clip, nrow=args.nrow,
                                class_labels=class_labels(args.class_labels), guidance_scale=args.guidance)
    except APIError as error:
        print(f"raydiff sample: {error}", file=sys.stderr)
        return 2 if error.status in (413, 422) else 1
    except OSError as error:  # connection refused, timeouts (requests' errors are OSErrors)
        print(f"raydiff sample: cannot reach {args.url}: {error}", file=sys.stderr)
        return 1
    if result.format == "grid":
        result.save_grid(args.output)
    else:
        import numpy as np

        np.save(args.output, result.array)
    r = result.response
    labels = r.get("class_labels")
    if labels:
        names = r["model"].get("class_names") or [str(k) for k in range(max(labels) + 1)]
        shown = sorted(set(labels), key=labels.index)
        conditioning = f", class {', '.join(names[k] for k in shown)} (guidance {r['guidance_scale']:g})"
    else:
        conditioning = ""
    print(f"wrote {args.output}: {r['shape'][0]} images, {r['sampler']} {r['steps']} steps, seed {r['seed']}"
          f"{conditioning}, model {r['model']['name']} v{r['model']['version']}, {r['timing']['total_s']:.2f}s")
    return 0


def add_commands(subparsers) -> None:
    """Add `serve` and `sample` to an argparse subparsers object (the raydiff CLI's)."""
    serve = subparsers.add_parser("serve", help="serve a registered model over HTTP with Ray Serve (until Ctrl-C)")
    serve.add_argument("--model-uri", required=True,
                       help="models:/NAME@champion, models:/NAME/VERSION or runs:/ID/model")
    serve.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--route-prefix", default="/")
    serve.add_argument("--name", default="raydiff", help="Serve application name")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--max-batch-size", type=int, default=16)
    serve.add_argument("--max-num-images", type=int, default=64)
    serve.add_argument("--request-timeout", type=float, default=300.0, help="seconds")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve.add_argument("--address", default="local", help="Ray address (default: start a local instance)")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    serve.set_defaults(func=cmd_serve)

    sample = subparsers.add_parser("sample", help="request samples from a running endpoint")
    sample.add_argument("--url", default="http://127.0.0.1:8000")
    sample.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim")
    sample.add_argument("--steps", type=int, default=None, help="default: the sampler's (T for ddpm, 50 for ddim)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM's η")
    sample.add_argument("-n", "--num-images", type=int, default=16)
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--nrow", type=int, default=None)
    sample.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0")
    sample.add_argument("--class", dest="class_labels", action="append", metavar="LABEL",
                        help="class-conditional models: a class index or name for all images, or one per image "
                             "(repeat, or a comma list: --class 3,1,4); see GET /v1/models for the classes")
    sample.add_argument("--guidance", type=float, default=None, metavar="S",
                        help="classifier-free guidance scale with --class (1: none, default; e.g. 3)")
    sample.add_argument("-o", "--output", default="grid.png", help=".png: a grid; .npy: float32 [N, C, H, W]")
    sample.add_argument("--timeout", type=float, default=600.0)
    sample.set_defaults(func=cmd_sample)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydiff")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
