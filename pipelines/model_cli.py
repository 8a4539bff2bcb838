"""`raydiff import-diffusers` and `raydiff export`, added to the raydiff CLI by `add_commands(subparsers)` (entry-point
group "raydiff.commands"):

    raydiff import-diffusers ./ddpm-cifar10-32 --name cifar10-ddpm --tracking-uri sqlite:///mlruns.db
    raydiff export models:/cifar10-ddpm@champion --format diffusers ./exported

An imported model is logged and registered like a trained one (pipelines.modelstore), so it is served, evaluated
and sampled the same way; an exported directory loads with `diffusers.DDPMPipeline.from_pretrained`.
"""

from __future__ import annotations

import argparse
import os


def _tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the local default (a relative sqlite path made absolute)."""
    from pipelines.tracking import absolute_sqlite, resolve_tracking_uri

    return absolute_sqlite(args.tracking_uri) if args.tracking_uri else resolve_tracking_uri(None)


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    """Log a local diffusers DDPM directory as a raydiff model, register it under --name and (with --alias) point the
    alias at the new version. MLflow's process-wide state (tracking URI, active experiment) is left as it was."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from diffusion.interop import load_diffusers_dir
    from pipelines.modelstore import log_model
    from pipelines.tracking import ensure_experiment, use_tracking_uri

    uri = _tracking_uri(args)
    model = load_diffusers_dir(args.directory)
    experiment_id = ensure_experiment(uri, args.experiment)
    run_name = f"import {os.path.basename(os.path.normpath(args.directory))}"
    with use_tracking_uri(uri):
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
            model.metadata.update({"training_run_id": run.info.run_id,
                                   "imported_from": os.path.abspath(args.directory)})
            log_model(model)
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", args.name).version
    if args.alias:
        MlflowClient(uri).set_registered_model_alias(args.name, args.alias, version)
    print(f"registered models:/{args.name}/{version}" + (f" (@{args.alias})" if args.alias else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the model at MODEL_URI as a diffusers DDPMPipeline directory."""
    from diffusion.interop import save_diffusers_dir
    from pipelines.modelstore import load_model
    from pipelines.tracking import use_tracking_uri

    with use_tracking_uri(_tracking_uri(args)):
        save_diffusers_dir(load_model(args.model_uri), args.output)
    print(f"wrote {args.output} (diffusers.DDPMPipeline.from_pretrained loads it)")
    return 0


def add_commands(subparsers) -> None:
    imported = subparsers.add_parser("import-diffusers", help="register a local diffusers DDPM model directory")
    imported.add_argument("directory", help="a diffusers DDPMPipeline directory (unet/, scheduler/)")
    imported.add_argument("--name", required=True, help="registered model name")
    imported.add_argument("--alias", default="champion", help="alias set to the new version ('' for none)")
    imported.add_argument("--experiment", default="raydiff-imports", help="MLflow experiment of the import run")
    imported.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")
    imported.set_defaults(func=cmd_import_diffusers)

    export = subparsers.add_parser("export", help="write a registered model in another library's format")
    export.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/model")
    export.add_argument("--format", choices=["diffusers"], required=True)
    export.add_argument("output", help="directory to write")
    export.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")
    export.set_defaults(func=cmd_export)
