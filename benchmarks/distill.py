"""Progressive distillation on the embedded digits at the default budget: the teacher is the default pipeline's train
stage (configs/local.yaml), distilled from its 64 DDIM steps down to 1 step; every round's student is scored (FID, KID
with the digits feature net, samples/s) against the test split, beside the teacher's DDIM-50 and DPM-Solver++-10 on
the same test images, feature net and sample count. Also the wall time of distilling against training the teacher.

    python -m benchmarks.distill [--steps-per-round 400] [--num-fid-samples 256] [--json PATH]

Targets (the distillation issue): 4-step student FID ≤ 1.1 × teacher DDIM-50; 1-step ≤ 2 × teacher DDIM-50.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def teacher_rows(model_uri: str, uri: str, splits: dict, num_samples: int) -> list[dict]:
    """FID/KID of the teacher's DDIM-50 and DPM-Solver++-10 against the test split, as the distill stage scores."""
    from pipelines.distill.config import DistillConfig
    from pipelines.distill.loop import round_scorer
    from pipelines.evaluate.sampling import balanced_labels, generate_samples, parse_sampler
    from pipelines.modelstore import load_model
    from pipelines.tracking import use_tracking_uri

    with use_tracking_uri(uri):
        teacher = load_model(model_uri)
    scorer = round_scorer(DistillConfig(num_fid_samples=num_samples), {"test_uri": str(splits["test"]),
                                                                      "train_uri": str(splits["train"])}, "cpu")
    rows = []
    for name in ("ddim-50", "dpmpp-2m-10"):
        samples = generate_samples(teacher, parse_sampler(name), num_samples, 256, 0,
                                   labels=balanced_labels(num_samples, teacher.num_classes))
        fid, kid, _ = scorer(samples.images)
        rows.append({"model": f"teacher {name}", "steps": parse_sampler(name).steps, "fid": fid, "kid": kid,
                     "samples_per_s": samples.samples_per_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-round", type=int, default=400)
    parser.add_argument("--num-fid-samples", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from pipelines.distill.config import DistillConfig
    from pipelines.distill.stage import run_distillation
    from pipelines.ingest.stage import run_ingest
    from pipelines.spec import load_spec
    from pipelines.train.stage import run_training

    spec = load_spec(ROOT / "configs" / "local.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    ray.init(address="local", include_dashboard=False, log_to_driver=True, num_cpus=4)
    try:
        splits = run_ingest(spec.stages["ingest"].params, tmp / "shards", progress=False).splits
        start = time.perf_counter()
        trained = run_training(spec.stages["train"].params, splits["train"], None, tmp / "train", uri, "bench")
        train_s = time.perf_counter() - start
        config = DistillConfig(teacher_steps=64, target_steps=1, steps_per_round=args.steps_per_round,
                               num_fid_samples=args.num_fid_samples, guidance_scale=1.0, lr=3e-4)
        start = time.perf_counter()
        values = run_distillation(config, trained.model_uri, splits["train"], tmp / "distill", uri, "bench",
                                  test_uri=splits["test"])
        distill_s = time.perf_counter() - start
        client = MlflowClient(uri)
        history = {key: {m.step: m.value for m in client.get_metric_history(values["run_id"], key)}
                   for key in ("fid", "kid", "samples_per_s")}
        rows = teacher_rows(trained.model_uri, uri, splits, args.num_fid_samples)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    rows += [{"model": f"student {n}", "steps": n, "fid": history["fid"][n], "kid": history["kid"][n],
              "samples_per_s": history["samples_per_s"][n]} for n in sorted(history["fid"], reverse=True)]
    base = rows[0]["fid"]
    print(f"\n== progressive distillation on the digits ({os.cpu_count()} cores): teacher trained in {train_s:.0f}s, "
          f"distilled 64 → 1 in {distill_s:.0f}s ({distill_s / train_s:.2f}× its training), "
          f"{args.steps_per_round} steps per round, {args.num_fid_samples} samples per FID")
    for row in rows:
        print(f"{row['model']:<22} steps {row['steps']:>3}  FID {row['fid']:8.2f} ({row['fid'] / base:5.2f}× teacher "
              f"DDIM-50)  KID {row['kid']:.4f}  {row['samples_per_s']:8.1f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"train_seconds": train_s, "distill_seconds": distill_s,
                                               "steps_per_round": args.steps_per_round, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
