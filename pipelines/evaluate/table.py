"""The sampler quality/time table (rows: one per sampler and step count) as CSV, Markdown (shaped like DDIM's
Table 1, with model calls across) and a plot of FID against model calls, one curve per sampler family.

A row is a dict with keys: sampler, kind, steps, model_calls, num_samples, num_ref_images (the test images every
FID/KID is against), seconds, samples_per_s, fid, kid, kid_stderr, feature_net (rows recorded before model_calls and
KID existed are read with model_calls = steps and no KID; missing cells show as "—").
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from diffusion.sampler_specs import SAMPLER_NAMES

COLUMNS = ["sampler", "kind", "steps", "model_calls", "num_samples", "num_ref_images", "seconds", "samples_per_s",
           "fid", "kid", "kid_stderr", "feature_net"]
KIND_LABELS = {"ddpm": "DDPM (σ² = β̃)", "ddim": "DDIM (η = 0)", "sde": "reverse SDE", "pc": "predictor–corrector",
               "ode-euler": "PF-ODE Euler", "ode-heun": "PF-ODE Heun", "dpmpp-2m": "DPM-Solver++(2M)"}


def _label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def _calls(row: dict) -> int:
    return row.get("model_calls", row["steps"])


def _cell(row: dict, column: str):
    return _calls(row) if column == "model_calls" else row.get(column, "—")


def _kinds(rows: list[dict]) -> list[str]:
    """The sampler families present, in the catalog's order."""
    present = {row["kind"] for row in rows}
    return [k for k in SAMPLER_NAMES if k in present] + sorted(present - set(SAMPLER_NAMES))


def write_table_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: _cell(row, k) for k in COLUMNS} for row in rows])
    return path


def _pivot(rows: list[dict], value: str, fmt: str) -> list[str]:
    calls = sorted({_calls(row) for row in rows})
    lines = ["| sampler | " + " | ".join(f"NFE = {n}" for n in calls) + " |", "|---|" + "---:|" * len(calls)]
    for kind in _kinds(rows):
        by_calls = {_calls(row): row[value] for row in rows if row["kind"] == kind}
        cells = [format(by_calls[n], fmt) if n in by_calls else "—" for n in calls]
        lines.append(f"| {_label(kind)} | " + " | ".join(cells) + " |")
    return lines


def write_table_markdown(rows: list[dict], path: Path, reference_fid: float | None = None,
                         reference_images: int | None = None) -> Path:
    """FID and samples/s pivoted as model calls (NFE) × sampler (Song et al. 2021, Table 1, across samplers whose
    steps cost different numbers of calls), then the full rows. reference_fid: the floor, real images the feature
    net never saw (reference_images of them) against the same test images."""
    net, n = rows[0]["feature_net"], rows[0]["num_samples"]
    against = f" against {rows[0]['num_ref_images']} test images" if "num_ref_images" in rows[0] else ""
    lines = [f"### FID ↓ ({net} features, {n} samples per sampler{against})", "", *_pivot(rows, "fid", ".2f"), ""]
    if reference_fid is not None:
        count = f"{reference_images} " if reference_images is not None else ""
        lines += [f"Floor: {count}real images the feature net never saw against the test images, same features: "
                  f"FID {reference_fid:.2f}", ""]
    if all("kid" in row for row in rows):
        lines += [f"### KID × 10³ ↓ (unbiased MMD², cubic kernel, {net} features; standard errors in the rows)", "",
                  *_pivot([{**row, "kid": 1e3 * row["kid"]} for row in rows], "kid", ".2f"), ""]
    lines += ["NFE counts model calls: one per step, two per Heun step but one on its last, (1 + corrector steps) per "
              "predictor–corrector step. Respaced samplers use their default spacing (DDPM, SDE, PC and the ODE "
              "solvers linspace τ, DDIM the paper's uniform τ, DPM-Solver++ uniform log-SNR).",
              "", "### Samples/s ↑", "", *_pivot(rows, "samples_per_s", ".1f"), "", "### All rows", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        values = [_cell(row, k) for k in COLUMNS]
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_fid_vs_model_calls(rows: list[dict], path: Path, reference_fid: float | None = None) -> Path:
    """PNG with two panels against model calls (log x): FID per sampler family, and samples/s."""
    fig = Figure(figsize=(10, 4), dpi=120)
    ax_fid, ax_speed = fig.subplots(1, 2)
    for kind in _kinds(rows):
        kind_rows = sorted((row for row in rows if row["kind"] == kind), key=_calls)
        calls = np.array([_calls(row) for row in kind_rows])
        ax_fid.plot(calls, [row["fid"] for row in kind_rows], "o-", label=_label(kind))
        ax_speed.plot(calls, [row["samples_per_s"] for row in kind_rows], "o-", label=_label(kind))
    if reference_fid is not None:
        ax_fid.axhline(reference_fid, color="gray", ls="--", lw=1,
                       label=f"floor: unseen real vs test ({reference_fid:.2f})")
    ax_fid.set(xscale="log", xlabel="model calls (NFE)", ylabel=f"FID ({rows[0]['feature_net']} features)",
               title="FID vs model calls")
    ax_speed.set(xscale="log", yscale="log", xlabel="model calls (NFE)", ylabel="samples / s", title="throughput")
    for ax in (ax_fid, ax_speed):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
