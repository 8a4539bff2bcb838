"""`raydiff sweep-status PIPELINE.yaml [--watch S]`: the trials of the pipeline's sweep stages and the best so far,
read from the status file each running (or finished) sweep keeps in its stage directory.

Registered as a raydiff command through the "raydiff.commands" entry point (`add_commands`); also runs as
`python -m pipelines.sweep.status PIPELINE.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipelines.storage import is_remote
from pipelines.sweep.report import SweepStatus, find_status_files


def sweep_status_lines(spec) -> list[str]:
    sweeps = [name for name, stage in spec.stages.items() if stage.kind in ("sweep", "pipelines.sweep.stage:KIND")]
    if not sweeps:
        return [f"pipeline {spec.name!r} has no sweep stage"]
    root = spec.storage.root
    if is_remote(root):
        return [f"sweep status is read from a local storage root; {root} is remote (see the sweep's MLflow run)"]
    lines = []
    for name in sweeps:
        files = find_status_files(root, name)
        if not files:
            lines.append(f"sweep {name!r}: no trials yet (nothing under {root}/stages/sweep-*)")
            continue
        status = SweepStatus.from_json(json.loads(files[0].read_text()))
        age = time.time() - status.updated
        lines += status.lines()
        lines.append(f"  ({files[0].parent}, updated {age:.0f}s ago)")
    return lines


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from pipelines.spec import load_spec

    spec = load_spec(args.pipeline, args.set)
    while True:
        print("\n".join(sweep_status_lines(spec)), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)
        print()


def add_commands(sub) -> None:
    parser = sub.add_parser("sweep-status", help="show a pipeline's sweep trials and the best so far")
    parser.add_argument("pipeline", help="pipeline YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--watch", type=float, default=0.0, metavar="S", help="repeat every S seconds")
    parser.set_defaults(func=cmd_sweep_status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydiff")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep-status", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
