"""The sampler quality/time table (rows: one per sampler) as CSV, Markdown (shaped like DDIM's Table 1) and a plot.

A row is a dict with keys: sampler, kind, steps, num_samples, seconds, samples_per_s, fid, feature_net.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

COLUMNS = ["sampler", "kind", "steps", "num_samples", "seconds", "samples_per_s", "fid", "feature_net"]
KIND_LABELS = {"ddim": "DDIM (η = 0)", "ddpm": "DDPM (σ² = β̃)"}


def write_table_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: row[k] for k in COLUMNS} for row in rows])
    return path


def _pivot(rows: list[dict], value: str, fmt: str) -> list[str]:
    steps = sorted({row["steps"] for row in rows})
    lines = ["| sampler | " + " | ".join(f"S = {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for kind in [k for k in KIND_LABELS if any(row["kind"] == k for row in rows)]:
        by_steps = {row["steps"]: row[value] for row in rows if row["kind"] == kind}
        cells = [format(by_steps[s], fmt) if s in by_steps else "—" for s in steps]
        lines.append(f"| {KIND_LABELS[kind]} | " + " | ".join(cells) + " |")
    return lines


def write_table_markdown(rows: list[dict], path: Path, reference_fid: float | None = None) -> Path:
    """FID and samples/s pivoted as steps S × sampler (Song et al. 2021, Table 1), then the full rows."""
    net, n = rows[0]["feature_net"], rows[0]["num_samples"]
    lines = [f"### FID ↓ ({net} features, {n} samples per sampler)", "", *_pivot(rows, "fid", ".2f"), ""]
    if reference_fid is not None:
        lines += [f"Real data (train vs test images, same feature net): FID {reference_fid:.2f}", ""]
    lines += ["DDPM with S < T respaces the schedule on linspace τ; DDIM uses the paper's uniform τ (0, T/S, 2T/S, …).",
              "", "### Samples/s ↑", "", *_pivot(rows, "samples_per_s", ".1f"), "", "### All rows", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_fid_vs_steps(rows: list[dict], path: Path, reference_fid: float | None = None) -> Path:
    """PNG with two panels against sampling steps (log x): FID per sampler kind, and samples/s."""
    fig = Figure(figsize=(10, 4), dpi=120)
    ax_fid, ax_speed = fig.subplots(1, 2)
    for kind in KIND_LABELS:
        kind_rows = sorted((row for row in rows if row["kind"] == kind), key=lambda row: row["steps"])
        if not kind_rows:
            continue
        steps = np.array([row["steps"] for row in kind_rows])
        ax_fid.plot(steps, [row["fid"] for row in kind_rows], "o-", label=KIND_LABELS[kind])
        ax_speed.plot(steps, [row["samples_per_s"] for row in kind_rows], "o-", label=KIND_LABELS[kind])
    if reference_fid is not None:
        ax_fid.axhline(reference_fid, color="gray", ls="--", lw=1, label=f"real train vs test ({reference_fid:.2f})")
    ax_fid.set(xscale="log", xlabel="sampling steps S", ylabel=f"FID ({rows[0]['feature_net']} features)",
               title="FID vs steps")
    ax_speed.set(xscale="log", yscale="log", xlabel="sampling steps S", ylabel="samples / s", title="throughput")
    for ax in (ax_fid, ax_speed):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
