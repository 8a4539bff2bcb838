"""Sample quality against sampling cost for a logged DiffusionModel: the DDIM paper's Table 1 extended to every
sampler family (FID per sampler against model calls) with wall time, plus held-out bits/dim; speed and FID ratios
are against the first sampler (the baseline, measured in the same run), and the few-step solvers are compared with
the samplers they should match: dpmpp-2m at 10 and 20 calls against ddim-50 (target: FID no worse), ode-heun-18
(35 calls) against ddpm-1000 (target: within 10%).

A class-conditional model also gets the evaluate stage's classifier-free guidance sweep (FID, KID and class accuracy
per guidance scale s, with the guidance sampler; an unconditional model skips it): the class accuracy at the best s
against the digits classifier's own on real held-out images (target: ≥ 90%), and guided FID at s = 1 against the
same sampler's unconditional (null-class) samples (target: no worse).

    python -m benchmarks.sampling_quality --model-uri models:/digits-ddpm/1 [--tracking-uri sqlite:///mlruns.db]
        [--samplers ddpm-1000 ddim-10 dpmpp-2m-10 ...] [--num-samples 500] [--quick] [--json PATH] [--output-dir DIR]
        [--guidance-scales 1 2 3 5] [--guidance-sampler ddim-50]

`--model-uri` is a logged raydiff model (runs:/…, models:/…) or a local `save_pretrained` model directory.
Data: scikit-learn digits at the model's resolution with a seeded 80/20 split (`--split-seed`); a model trained by
the pipeline's ingest split may have seen some of these test images, which flatters its bits/dim and the FID of the
samplers that reproduce training images most faithfully. So for a model that a pipeline trained the benchmark reads
the train and test splits that pipeline's ingest stage wrote (found through MLflow: the model's training run, its
pipeline run, the ingest run's stage record), and every test image is one the model never saw; `--splits DIR` names
them directly (DIR holds `train/` and `test/`, e.g. `.raydiff/stages/ingest-<key>/ingest-<id>`).
The FID feature network is the digits CNN of the evaluate stage (trained once on the TRAIN part, then cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError

from benchmarks.report import Row, machine
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.digits import digits_split
from pipelines.evaluate.stage import run_evaluate

FAMILIES = ["ddpm-1000", "ddpm-100", "ddim-10", "ddim-20", "ddim-50", "ddim-100", "sde-100", "sde-250", "pc-50",
            "pc-125", "ode-heun-10", "ode-heun-18", "ode-heun-50", "dpmpp-2m-10", "dpmpp-2m-20", "dpmpp-2m-50"]
QUICK = {"samplers": ["ddpm-100", "ddim-10", "ddim-20", "dpmpp-2m-10", "ode-heun-6"], "num_samples": 100,
         "bpd_batches": 1, "bpd_batch_size": 16, "guidance_scales": [1.0, 3.0], "guidance_sampler": "ddim-20"}
# (ours, baseline, target, least ratio): FID comparisons of the few-step solvers (lower FID is better)
TARGETS = [("dpmpp-2m-10", "ddim-50", "≥ 1.0× (FID ≤ ddim-50)", 1.0),
           ("dpmpp-2m-20", "ddim-50", "≥ 1.0× (FID ≤ ddim-50)", 1.0),
           ("ode-heun-18", "ddpm-1000", "≥ 0.91× (within 10%)", 1 / 1.1)]
GUIDED_FID_TARGET = ("≥ 1.0× (FID ≤ unconditional)", 1.0)
ACCURACY_TARGET = ("≥ 90%", 90.0)  # class accuracy (%) at the best guidance scale


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="MLflow model URI or local MLflow model directory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.add_argument("--samplers", nargs="+", help="'<sampler>-<steps>' strings (any registered sampler); the first is "
                                                 f"the baseline (default: {' '.join(FAMILIES)})")
    p.add_argument("--num-samples", type=int, help="samples per sampler for FID")
    p.add_argument("--bpd-batches", type=int)
    p.add_argument("--bpd-batch-size", type=int)
    p.add_argument("--sample-batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--splits", type=Path, help="an ingest stage's output holding train/ and test/ webdataset splits "
                                               "(default: those of the pipeline that trained the model, else a "
                                               "seeded split of the embedded digits)")
    p.add_argument("--cache-dir", help="digits feature net cache (default ~/.cache/raydiff)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", help="plots, grids and tables (default: a new temporary directory)")
    p.add_argument("--guidance-scales", nargs="+", type=float,
                   help="conditional models: guidance scales to sweep (default: the evaluate stage's 1 2 3 5)")
    p.add_argument("--guidance-sampler", help="conditional models: the sweep's sampler (default ddim-50)")
    p.add_argument("--quick", action="store_true", help=f"smoke settings: {QUICK}")
    p.add_argument("--json", help="write the numbers here")
    return p.parse_args(argv)


def load_model(uri: str, tracking_uri: str | None, device: str) -> torch.nn.Module:
    import mlflow

    from diffusion.packaged import CONFIG_FILE, DiffusionModel
    from pipelines.modelstore import load_model as load_logged

    if (Path(uri) / CONFIG_FILE).is_file():
        return DiffusionModel.from_pretrained(uri, device)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return load_logged(uri, device)


def pipeline_splits(model: torch.nn.Module, tracking_uri: str | None) -> tuple[Path, Path] | None:
    """Local copies of the (train, test) split directories that the pipeline which trained `model` ingested, found
    through MLflow (the model's training run → its pipeline run → that pipeline's ingest run → the ingest stage's
    record), or None for a model that no reachable pipeline trained."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.cache import read_record
    from pipelines.storage import Storage

    run_id = getattr(model, "metadata", {}).get("training_run_id")
    if not run_id:
        return None
    client = mlflow.MlflowClient(tracking_uri)
    try:
        train = client.get_run(run_id)
    except MlflowException:
        return None
    parent = train.data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    siblings = client.search_runs([train.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    ingests = {run.data.tags.get("raydiff.output_uri") for run in siblings
               if run.data.tags.get("raydiff.kind") == "ingest"}
    if len(ingests) != 1 or None in ingests:
        return None
    storage = Storage(next(iter(ingests)))
    record = read_record(storage, storage.root)
    splits = record.values.get("splits", {}) if record is not None else {}
    if "train" not in splits or "test" not in splits:
        return None
    return storage.localize(splits["train"]), storage.localize(splits["test"])


def load_data(args: argparse.Namespace, size: int, model: torch.nn.Module | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train images [M, 1, size, size], train labels [M], test images [N, 1, size, size], where they came from), all
    in [−1, 1]: --splits, else the splits of the pipeline that trained `model`, else a seeded digits split."""
    if args.splits is not None:
        dirs = args.splits / "train", args.splits / "test"
    else:
        dirs = pipeline_splits(model, args.tracking_uri) if model is not None else None
    if dirs is None:
        train_x, train_y, test_x, _ = digits_split(size=size, seed=args.split_seed)
        return train_x, train_y, test_x, (f"the embedded digits, seeded 80/20 split (seed {args.split_seed}; a model "
                                          "trained on other splits may have seen some of them: see --splits)")
    from pipelines.ingest.reader import load_split_tensor

    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"no split directory {' or '.join(missing)} (an ingest stage's output holds train/ and test/)")
    (train_x, train_y), (test_x, _) = load_split_tensor(dirs[0]), load_split_tensor(dirs[1])
    if train_x.shape[-1] != size or test_x.shape[-1] != size:
        raise SystemExit(f"splits {dirs[0]}, {dirs[1]}: images are {test_x.shape[-1]}×{test_x.shape[-1]}, "
                         f"the model samples {size}×{size}")
    return train_x, train_y, test_x, f"the ingest splits {dirs[0]} and {dirs[1]}"


def build_config(args: argparse.Namespace) -> EvaluateConfig:
    defaults = EvaluateConfig()
    quick = QUICK if args.quick else {}

    def pick(name: str, default):
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    return EvaluateConfig(samplers=pick("samplers", FAMILIES),
                          num_fid_samples=pick("num_samples", defaults.num_fid_samples),
                          bpd_batches=pick("bpd_batches", defaults.bpd_batches),
                          bpd_batch_size=pick("bpd_batch_size", defaults.bpd_batch_size),
                          sample_batch_size=args.sample_batch_size, seed=args.seed, feature_cache_dir=args.cache_dir,
                          guidance_scales=pick("guidance_scales", defaults.guidance_scales),
                          guidance_sampler=pick("guidance_sampler", defaults.guidance_sampler))


def ratio_rows(table: list[dict]) -> list[Row]:
    """Each sampler's samples/s and FID against the first sampler's (FID: lower is better)."""
    base = table[0]
    rows = []
    for row in table[1:]:
        rows.append(Row(f"{row['sampler']} samples/s vs {base['sampler']}", row["samples_per_s"],
                        base["samples_per_s"], "img/s"))
        rows.append(Row(f"{row['sampler']} FID vs {base['sampler']}", row["fid"], base["fid"], "FID",
                        lower_is_better=True))
    by_name = {row["sampler"]: row for row in table}
    for ours, baseline, target, _ in TARGETS:
        if ours in by_name and baseline in by_name:
            calls = by_name[ours].get("model_calls", by_name[ours]["steps"])
            rows.append(Row(f"{ours} ({calls} calls) FID vs {baseline}", by_name[ours]["fid"],
                            by_name[baseline]["fid"], "FID", target, lower_is_better=True))
    return rows


def guidance_rows(guidance: list[dict], metrics: dict, table: list[dict]) -> list[Row]:
    """The sweep's targets: class accuracy at the most accurate s against the classifier's own accuracy on real
    held-out images, and guided FID at s = 1 against the same sampler's unconditional samples (when it ran)."""
    if not guidance:
        return []
    best = max(guidance, key=lambda row: (row["class_accuracy"], -row["guidance_scale"]))
    rows = [Row(f"class accuracy at s = {best['guidance_scale']:g} (best of the sweep) vs classifier on real",
                100 * best["class_accuracy"], 100 * metrics["classifier_val_accuracy"], "%", ACCURACY_TARGET[0])]
    by_scale = {row["guidance_scale"]: row for row in guidance}
    unconditional = next((row for row in table if row["sampler"] == guidance[0]["sampler"]), None)
    if 1.0 in by_scale and unconditional is not None:
        sampler = guidance[0]["sampler"]
        rows.append(Row(f"guided FID at s = 1 ({sampler}) vs unconditional {sampler}", by_scale[1.0]["fid"],
                        unconditional["fid"], "FID", GUIDED_FID_TARGET[0], lower_is_better=True))
        rows.append(Row(f"guided KID × 10³ at s = 1 ({sampler}) vs unconditional {sampler}",
                        1e3 * by_scale[1.0]["kid"], 1e3 * unconditional["kid"], "KID×10³", lower_is_better=True))
    return rows


def missed_targets(rows: list[Row]) -> list[str]:
    least = {target: ratio for _, _, target, ratio in TARGETS}
    least[GUIDED_FID_TARGET[0]] = GUIDED_FID_TARGET[1]
    missed = [row.what for row in rows if row.target in least and row.ratio < least[row.target]]
    return missed + [row.what for row in rows if row.target == ACCURACY_TARGET[0] and row.ours < ACCURACY_TARGET[1]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ValidationError as exc:
        raise SystemExit(f"invalid settings: {exc}") from None
    model = load_model(args.model_uri, args.tracking_uri, args.device)
    if getattr(model, "num_classes", None) is None:
        if args.guidance_scales is not None or args.guidance_sampler is not None:
            raise SystemExit(f"--guidance-scales / --guidance-sampler need a class-conditional model; "
                             f"{args.model_uri!r} is unconditional")
        config = config.model_copy(update={"guidance_scales": []})  # nothing to sweep
    channels, size, _ = model.image_shape
    if channels != 1:
        raise SystemExit(f"the digits benchmark needs a 1-channel model; {args.model_uri!r} has {channels} channels")
    train_x, train_y, test_x, data = load_data(args, size, model)
    print(f"test images: {data}")
    output_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="sampling_quality_"))
    result = run_evaluate(config, model, test_x, train_x, train_y, output_dir)

    m = result.metrics
    print(f"\n== sampling quality: {args.model_uri} ({machine()})")
    print(f"held-out bits/dim {m['test_bpd']:.4f} ± {m['test_bpd_stderr']:.4f} = prior {m['test_prior_bpd']:.2e} "
          f"+ Σ KL {m['test_vb_bpd']:.4f} + decoder {m['test_decoder_bpd']:.4f} "
          f"({int(m['test_bpd_num_images'])} images)")
    print((output_dir / "sampler_table.md").read_text())
    if result.guidance:
        print((output_dir / "guidance_table.md").read_text())
    rows = ratio_rows(result.table) + guidance_rows(result.guidance, m, result.table)
    for row in rows:
        print(row.line())
    print(f"artifacts in {output_dir}")
    missed = missed_targets(rows)
    if missed:
        print(f"targets missed: {'; '.join(missed)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "title": "sampling quality", "machine": machine(), "model_uri": args.model_uri, "test_data": data,
            "config": config.model_dump(), "metrics": m, "table": result.table, "guidance": result.guidance,
            "ratios": [{"what": r.what, "ours": r.ours, "baseline": r.baseline, "ratio": r.ratio} for r in rows],
            "rows": [{"what": r.what, "ours": r.ours, "baseline": r.baseline, "unit": r.unit, "target": r.target,
                      "ratio": r.ratio} for r in rows if r.target],
            "artifacts": [str(p) for p in result.artifacts]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
