"""The `raydiff` command line.

    raydiff run configs/local.yaml [--set train.steps=500] [--no-cache] [--no-serve-wait] [--verbose]
    raydiff submit configs/cifar10-gpu.yaml --address http://HEAD:8265 [--no-wait]
    raydiff status [JOB] / raydiff logs JOB [--follow]
    raydiff dag configs/local.yaml [--format text|mermaid|png] [-o dag.png]
    raydiff ui [configs/local.yaml] [--port 5000]
    raydiff serve --model-uri models:/digits-ddpm@champion / raydiff sample --url http://127.0.0.1:8000
    raydiff info / raydiff doctor

Further commands (`serve`, `sample`) come from the entry-point group "raydiff.commands": each entry is a function
called with the subparsers object.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterator

DEFAULT_PIPELINE = "configs/local.yaml"
COMMANDS_GROUP = "raydiff.commands"


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Turn the first SIGINT or SIGTERM into KeyboardInterrupt and record it in the yielded list (Ray re-raises an
    interrupt that arrives while it waits as a plain KeyboardInterrupt); later ones are ignored, so the shutdown they
    started ends cleanly. Ray's own SIGTERM handling (an exit with a native stack dump) stays out of the way."""
    received: list[int] = []

    def stop(signum: int, frame) -> None:
        if not received:
            received.append(signum)
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shutdown_ray(stop_serve: bool) -> None:
    """Shut Serve down first when asked (its replicas finish their requests), then leave Ray: a local instance this
    process started goes down with it, a cluster that was joined is only disconnected from."""
    import ray

    if not ray.is_initialized():
        return
    if stop_serve:
        from ray import serve

        serve.shutdown()
    ray.shutdown()


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from diffusion.unet import PRESETS, UNet, UNetConfig, count_parameters

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name in PRESETS:
        print(f"U-Net preset {name!r}: {count_parameters(UNet(UNetConfig.preset(name))) / 1e6:.2f}M parameters")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pipelines.doctor import report, run_checks

    text, code = report(run_checks(Path.cwd()))
    print(text)
    return code


def _load(args: argparse.Namespace):
    from pipelines.spec import load_spec

    return load_spec(args.pipeline, args.set)


def summary(result) -> list[str]:
    """The closing lines of `raydiff run`: where to find everything the run produced."""
    counts = {s: list(result.status.values()).count(s) for s in ("cached", "done", "failed", "skipped")}
    lines = [f"[raydiff] pipeline {result.pipeline!r} finished in {result.seconds:.1f}s: "
             f"{counts['done']} ran, {counts['cached']} cached",
             f"  run id    {result.run_id}",
             f"  MLflow    {result.mlflow_url}" + ("" if result.tracking_uri.startswith("http")
                                                   else f"   (start the UI with: raydiff ui; store {result.tracking_uri})")]
    for url in result.values_of_kind("deploy", "url"):
        lines.append(f"  endpoint  {url}")
    for samples in result.values_of_kind("evaluate", "samples"):
        if samples:
            from pipelines.storage import parent_uri, uri_name

            lines.append(f"  samples   {parent_uri(samples[0])}  ({', '.join(uri_name(s) for s in samples)})")
    for reg in (r.values for r in result.records.values() if r.kind == "register"):
        verdict = "promoted to" if reg["promoted"] else "did not beat"
        lines.append(f"  model     models:/{reg['name']}/{reg['version']} ({reg['metric']}={reg['value']:.4g}) "
                     f"{verdict} @{reg['alias']} (now version {reg['champion_version'] or '-'})")
    lines.append(f"  outputs   {result.storage_root}")
    return lines


def _console(spec, args: argparse.Namespace):
    """The live display (a terminal) or plain lines (a pipe, a file), Ray's own output in a log file; None with
    --verbose, which prints everything as it comes."""
    if args.verbose:
        return None
    from pipelines.console import Console, log_path
    from pipelines.dag import stage_order
    from pipelines.stage_board import StageBoard
    from pipelines.storage import Storage

    storage = Storage(spec.storage.root)
    stages = [(name, spec.stages[name].kind, len(spec.stages[name].params_json().get("samplers") or []))
              for name in stage_order(spec)]
    live = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    return Console(StageBoard(stages), log_path(storage.work_dir(storage.uri()), spec.name), live=live)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline, then serve its endpoint until SIGINT/SIGTERM when it started a local Ray. A signal during the
    run marks the MLflow runs KILLED (the next run resumes) and exits 128 + signal; one while serving exits 0."""
    spec = _load(args)
    console = _console(spec, args)
    if console is None:
        return _run(spec, args, lambda text, err=False: print(text, file=sys.stderr if err else sys.stdout, flush=True),
                    None, lambda: None, lambda: None)
    with console.running():
        return _run(spec, args, console.say, console.stage, console.stop_display, console.settle)


def _run(spec, args: argparse.Namespace, say, on_stage, end_display, settle) -> int:
    from pipelines.runner.execute import PipelineFailed, Runner

    runner = Runner(spec, no_cache=args.no_cache, log=say, on_stage=on_stage)
    with stop_on_signals() as received:
        try:
            result = runner.run()
        except PipelineFailed as failure:
            end_display()
            say(f"[raydiff] pipeline {spec.name!r} FAILED: {failure}\n  run id    {failure.result.run_id}\n"
                f"  MLflow    {failure.result.mlflow_url}", err=True)
            settle()
            shutdown_ray(stop_serve=False)
            return 1
        except KeyboardInterrupt:
            end_display()
            signum = received[0] if received else signal.SIGINT
            say(f"[raydiff] {signal.Signals(signum).name}: pipeline {spec.name!r} stopped, its MLflow runs marked "
                "KILLED; run it again to resume", err=True)
            shutdown_ray(stop_serve=False)
            return 128 + signum
        end_display()
        endpoints = result.values_of_kind("deploy", "url")
        serving = bool(endpoints) and runner.started_ray and not args.no_serve_wait
        try:
            say("\n".join(summary(result)))
            if serving:
                say(f"[raydiff] serving {endpoints[0]} from this process's Ray instance; Ctrl-C stops it "
                    "(--no-serve-wait exits right after deploying)")
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            say(f"[raydiff] {signal.Signals(received[0] if received else signal.SIGINT).name}: stopping")
        settle()
        shutdown_ray(stop_serve=serving)  # now, not at exit: Ray's last relayed lines still reach the console's log
    return 0


def cmd_dag(args: argparse.Namespace) -> int:
    from pipelines.dag_render import render_mermaid, render_png, render_text

    spec = _load(args)
    if args.format == "png":
        path = render_png(spec, args.output or f"{spec.name}-dag.png")
        print(f"wrote {path}")
        return 0
    text = render_mermaid(spec) if args.format == "mermaid" else render_text(spec)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import PipelineOutsideWorkingDir, follow_logs, submit_pipeline

    env = dict(item.split("=", 1) for item in args.env)
    try:
        client, job_id = submit_pipeline(args.pipeline, args.address, args.set, no_cache=args.no_cache,
                                         working_dir=args.working_dir, env=env, token=args.token)
    except PipelineOutsideWorkingDir as error:
        print(f"raydiff: {error}", file=sys.stderr)
        return 2
    print(f"[raydiff] submitted job {job_id}", flush=True)
    if args.no_wait:
        print(f"  follow it with: raydiff logs {job_id} --follow   (status: raydiff status {job_id})")
        return 0
    status = follow_logs(client, job_id)
    print(f"[raydiff] job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.submit import describe_jobs, job_client

    print("\n".join(describe_jobs(job_client(args.address, args.token), args.job)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from pipelines.submit import follow_logs, job_client

    client = job_client(args.address, args.token)
    if args.follow:
        status = follow_logs(client, args.job)
        print(f"[raydiff] job {args.job} {status}")
        return 0 if status == "SUCCEEDED" else 1
    sys.stdout.write(client.get_job_logs(args.job))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pipelines.tracking import resolve_tracking_uri

    configured = _load(args).tracking.uri if args.pipeline else None
    uri = resolve_tracking_uri(configured)
    if uri.startswith(("http://", "https://")):
        print(f"MLflow is served at {uri}")
        return 0
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port)]
    print(f"MLflow UI for {uri}: http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    with subprocess.Popen(command) as process:
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.terminate()
            return 0


def _pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE, help=f"pipeline YAML (default {DEFAULT_PIPELINE})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a var (steps=500) or a field (train.steps=500, tracking.uri=...); repeatable")


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--token", default=None, help="auth token (default: $RAY_AUTH_TOKEN or ~/.ray/auth_token)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and model sizes").set_defaults(func=cmd_info)
    sub.add_parser("doctor", help="check what a run needs (Python, torch, Ray, free ports, disk, Chromium for the "
                                  "tests) and say what to fix").set_defaults(func=cmd_doctor)

    run = sub.add_parser("run", help="run a pipeline on local Ray (or the cluster its file names)")
    _pipeline_args(run)
    run.add_argument("--no-cache", action="store_true", help="recompute every stage")
    run.add_argument("--no-serve-wait", action="store_true",
                     help="exit after deploying instead of serving until Ctrl-C (a local Ray ends with this process)")
    run.add_argument("--verbose", "-v", action="store_true",
                     help="print Ray's own output here too (default: in a log file under the storage root)")
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="run a pipeline on a Ray cluster through the Ray Jobs API")
    _pipeline_args(submit)
    _cluster_args(submit)
    submit.add_argument("--no-cache", action="store_true")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default .)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job environment variable")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="list jobs, or show one")
    status.add_argument("job", nargs="?")
    _cluster_args(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="print a job's logs")
    logs.add_argument("job")
    logs.add_argument("--follow", "-f", action="store_true")
    _cluster_args(logs)
    logs.set_defaults(func=cmd_logs)

    dag = sub.add_parser("dag", help="print the pipeline's stage graph")
    _pipeline_args(dag)
    dag.add_argument("--format", choices=["text", "mermaid", "png"], default="text")
    dag.add_argument("-o", "--output", help="write to this file (png default: NAME-dag.png)")
    dag.set_defaults(func=cmd_dag)

    ui = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    ui.add_argument("pipeline", nargs="?", help="use this pipeline's tracking.uri (default: $MLFLOW_TRACKING_URI "
                                               "or sqlite:///mlruns.db)")
    ui.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    from pipelines.sweep.status import add_commands as add_sweep_commands  # light: imports on call

    add_sweep_commands(sub)
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as error:
        print(f"raydiff: invalid pipeline — {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:  # the Jobs API: unreachable, or refused our token
        print(f"raydiff: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
