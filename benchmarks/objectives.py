"""Training objectives at the default budget: one row per option set, each a real pipeline run (ingest → train →
evaluate) of configs/local.yaml with only the objective options changed, same steps, batch and seed.

    python -m benchmarks.objectives [--rows NAME ...] [--steps N] [--out benchmarks/results/objectives.json]

Per row: held-out bits/dim with its L_T / Σ L_{t−1} / L_0 split (the test split's first 2 × 64 images), the decoder term
L_0 alone, FID and KID (with its standard error) of DDPM-100 and DDIM-50 against the test images, and training img/s.
The first row is today's default and the baseline of every ratio. Targets (issue "Training objectives"): l_hybrid
with a learned variance ≥ 0.6 bits/dim below the baseline's held-out ELBO with FID within 10%. The default row also
runs the evaluate stage's guidance sweep when the default model is class-conditional. Ingest is shared (cached).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "local.yaml"
SAMPLERS = ["ddpm-100", "ddim-50"]
ROWS: dict[str, list[str]] = {
    "l_simple (default)": [],
    "l_hybrid + learned Σ": ["train.objective=l_hybrid", "train.model.learn_variance=true"],
    "l_hybrid + learned Σ, cosine": ["train.objective=l_hybrid", "train.model.learn_variance=true",
                                     "train.schedule.name=cosine"],
    "l_vlb + learned Σ, importance-sampled t": ["train.objective=l_vlb", "train.model.learn_variance=true"],
    "v-prediction, min-SNR-5": ["train.model.prediction=v", "train.loss_weighting=min_snr"],
    "v-prediction, zero terminal SNR": ["train.model.prediction=v", "train.schedule.zero_terminal_snr=true"],
}
HYBRID_ROW = "l_hybrid + learned Σ"
TARGET_BPD_GAIN, TARGET_FID_SLACK = 0.6, 1.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS),
                        help="option sets to run (the first listed is the ratios' baseline)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the local default's)")
    parser.add_argument("--num-fid-samples", type=int, default=500)
    parser.add_argument("--work-dir", default=None, help="storage and MLflow store (default: a temporary directory)")
    parser.add_argument("--out", default=str(HERE / "results" / "objectives.json"))
    return parser.parse_args(argv)


def pipeline_spec(row: list[str], work_dir: Path, args: argparse.Namespace, guidance: bool):
    """configs/local.yaml without register/deploy, evaluating SAMPLERS, with the row's overrides."""
    from pipelines.spec import build_spec, parse_yaml

    text = CONFIG.read_text()
    raw = parse_yaml(text, str(CONFIG))
    for stage in ("register", "deploy"):
        raw["stages"].pop(stage)
    raw["storage"] = {"root": str(work_dir / "storage")}
    raw["tracking"] = {"uri": f"sqlite:///{work_dir / 'mlruns.db'}", "experiment": "bench-objectives"}
    overrides = [*row, f"evaluate.samplers={json.dumps(SAMPLERS)}", "evaluate.bpd_batches=2",
                 f"evaluate.num_fid_samples={args.num_fid_samples}", "evaluate.sample_batch_size=250"]
    if not guidance:
        overrides.append("evaluate.guidance_scales=[]")
    if args.steps:
        overrides.append(f"steps={args.steps}")
    return build_spec(raw, overrides, str(CONFIG), text, str(CONFIG))


def run_row(name: str, row: list[str], work_dir: Path, args: argparse.Namespace, guidance: bool) -> dict:
    from pipelines.runner.execute import PipelineFailed, Runner

    spec = pipeline_spec(row, work_dir, args, guidance)
    start = time.perf_counter()
    result = Runner(spec, log=lambda line: print(f"  {line}", flush=True)).run()
    if not result.ok:
        raise PipelineFailed(result)
    train, evaluate = result.records["train"].metrics, result.records["evaluate"].metrics
    values = {"row": name, "overrides": row, "seconds": time.perf_counter() - start,
              "train_images_per_s": train.get("images_per_s"), "train_steps": spec.stages["train"].params.steps}
    for key in ("test_bpd", "test_bpd_stderr", "test_prior_bpd", "test_vb_bpd", "test_decoder_bpd",
                "test_bpd_num_images", "fid_num_samples"):
        values[key] = evaluate.get(key)
    for sampler in SAMPLERS:
        for metric in ("fid", "kid", "kid_stderr"):
            key = f"{metric}_{sampler}" if metric != "kid_stderr" else f"kid_{sampler}_stderr"
            values[key] = evaluate.get(key)
    values["guidance"] = {k: v for k, v in evaluate.items()
                          if k.startswith(("fid_guided_", "kid_guided_", "class_accuracy_"))}
    return values


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| option set | held-out bits/dim (Δ vs first) | L_T | Σ L_{t−1} | L_0 | FID DDPM-100 | KID DDPM-100 "
             "| FID DDIM-50 | KID DDIM-50 | train img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = r["test_bpd"] - base["test_bpd"]
        lines.append(
            f"| {r['row']} | {r['test_bpd']:.3f} ± {r['test_bpd_stderr']:.3f} ({delta:+.3f}) | {r['test_prior_bpd']:.1e} "
            f"| {r['test_vb_bpd']:.3f} | {r['test_decoder_bpd']:.3f} | "
            + " | ".join(f"{r[f'fid_{s}']:.1f} | {r[f'kid_{s}']:.4f} ± {r[f'kid_{s}_stderr']:.4f}" for s in SAMPLERS)
            + f" | {r['train_images_per_s']:.0f} |")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    by_name = {r["row"]: r for r in rows}
    base, hybrid = rows[0], by_name.get(HYBRID_ROW)
    if hybrid is None or hybrid is base:
        return []
    gain = base["test_bpd"] - hybrid["test_bpd"]
    fid_ratio = max(hybrid[f"fid_{s}"] / base[f"fid_{s}"] for s in SAMPLERS)
    return [f"{HYBRID_ROW}: held-out ELBO {gain:+.3f} bits/dim below {base['row']} (target ≥ {TARGET_BPD_GAIN}) "
            f"{'MET' if gain >= TARGET_BPD_GAIN else 'MISSED'}",
            f"{HYBRID_ROW}: worst FID ratio vs {base['row']} {fid_ratio:.2f} (target ≤ {TARGET_FID_SLACK}) "
            f"{'MET' if fid_ratio <= TARGET_FID_SLACK else 'MISSED'}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_objectives_")).resolve()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, name in enumerate(args.rows):
        print(f"== {name}: {' '.join(ROWS[name]) or '(the default)'}", flush=True)
        rows.append(run_row(name, ROWS[name], work_dir, args, guidance=k == 0))
        table = markdown_table(rows)  # written after every row: a long run keeps what it measured
        out.write_text(json.dumps({"machine": machine(), "rows": rows, "table": table,
                                   "targets": target_lines(rows)}, indent=2))
    print(f"\n== training objectives ({machine()}), {rows[0]['train_steps']} steps each\n{table}")
    for line in target_lines(rows):
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
