"""The classifier-free guidance sweep's table (one row per guidance scale s: FID, KID ± its standard error, the class
accuracy of the digits classifier on the samples, sample counts, time) as CSV and Markdown, and its plot:
FID, KID and class accuracy against s, and FID against accuracy (the trade-off guidance buys).

A row is a dict with keys GUIDANCE_COLUMNS plus per_class_accuracy (a list, one value per class; JSON only).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

GUIDANCE_COLUMNS = ["guidance_scale", "sampler", "model_calls", "num_samples", "num_ref_images", "seconds",
                    "samples_per_s", "fid", "kid", "kid_stderr", "class_accuracy", "feature_net"]


def scale_tag(scale: float) -> str:
    """The metric-name form of a guidance scale: 2.0 → "s2", 2.5 → "s2.5", 0.0 → "s0"."""
    return f"s{scale:g}"


@dataclass(frozen=True)
class Reference:
    """A real-data comparison drawn in the table and plot: FID and KID of `num_images` images against the test set."""

    label: str
    fid: float
    kid: float
    kid_stderr: float
    num_images: int


@torch.no_grad()
def predict_labels(net: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """The classifier's arg-max labels [N] int64 (CPU) for images [N, C, H, W] in [−1, 1]."""
    out = [net(images[i:i + batch_size].to(device, torch.float32)).argmax(dim=1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """(fraction of predicted == labels, that fraction per class 0..K−1; NaN for a class with no samples)."""
    if predicted.shape != labels.shape or labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"predicted and labels must be equal [N > 0], got {tuple(predicted.shape)} and "
                         f"{tuple(labels.shape)}")
    hits = (predicted == labels).double()
    per_class = [float(hits[labels == k].mean()) if bool((labels == k).any()) else float("nan")
                 for k in range(num_classes)]
    return float(hits.mean()), per_class


def write_guidance_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=GUIDANCE_COLUMNS)
        writer.writeheader()
        writer.writerows([{k: row[k] for k in GUIDANCE_COLUMNS} for row in rows])
    return path


def write_guidance_markdown(rows: list[dict], path: Path, class_names: list[str], references: list[Reference],
                            classifier_accuracy: float | None = None) -> Path:
    """The sweep as a table (s down, FID / KID × 10³ ± s.e. / class accuracy / samples/s across), the real-data
    references with their image counts, then the class accuracy per class."""
    first = rows[0]
    per_class = first["num_samples"] / len(class_names)
    lines = [f"### Classifier-free guidance ({first['sampler']}, {first['num_samples']} samples per scale, "
             f"{per_class:g} per class; {first['feature_net']} features against {first['num_ref_images']} test images)",
             "", "| s | FID ↓ | KID × 10³ ↓ | class accuracy ↑ | samples/s |", "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['guidance_scale']:g} | {row['fid']:.2f} | {1e3 * row['kid']:.2f} ± "
                     f"{1e3 * row['kid_stderr']:.2f} | {100 * row['class_accuracy']:.1f}% | "
                     f"{row['samples_per_s']:.1f} |")
    lines.append("")
    for ref in references:
        lines.append(f"- {ref.label}: FID {ref.fid:.2f}, KID × 10³ {1e3 * ref.kid:.2f} ± {1e3 * ref.kid_stderr:.2f} "
                     f"({ref.num_images} images against the {first['num_ref_images']} test images)")
    if classifier_accuracy is not None:
        lines.append(f"- class accuracy is the share of samples of class y that the digits classifier labels y; its "
                     f"own accuracy on real held-out images is {100 * classifier_accuracy:.1f}%.")
    lines += ["", "### Class accuracy per class", "", "| s | " + " | ".join(class_names) + " |",
              "|---:|" + "---:|" * len(class_names)]
    for row in rows:
        cells = [f"{100 * a:.0f}%" if a == a else "—" for a in row["per_class_accuracy"]]
        lines.append(f"| {row['guidance_scale']:g} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_guidance(rows: list[dict], path: Path, references: list[Reference],
                  classifier_accuracy: float | None = None) -> Path:
    """PNG, four panels: FID, KID × 10³ (± s.e.) and class accuracy against the guidance scale s, and FID against
    class accuracy with each point labelled by its s; real-data references as horizontal lines."""
    rows = sorted(rows, key=lambda row: row["guidance_scale"])
    s = [row["guidance_scale"] for row in rows]
    fid = [row["fid"] for row in rows]
    accuracy = [100 * row["class_accuracy"] for row in rows]
    fig = Figure(figsize=(16, 4), dpi=110)
    ax_fid, ax_kid, ax_acc, ax_trade = fig.subplots(1, 4)
    ax_fid.plot(s, fid, "o-", color="C0", label="guided samples")
    ax_kid.errorbar(s, [1e3 * row["kid"] for row in rows], yerr=[1e3 * row["kid_stderr"] for row in rows], fmt="o-",
                    color="C1", capsize=3, label="guided samples (± s.e.)")
    for k, ref in enumerate(references):
        style = dict(color=f"C{k + 2}", ls="--", lw=1)
        ax_fid.axhline(ref.fid, label=f"{ref.label} ({ref.fid:.2f})", **style)
        ax_kid.axhline(1e3 * ref.kid, label=f"{ref.label} ({1e3 * ref.kid:.2f})", **style)
    ax_acc.plot(s, accuracy, "o-", color="C0", label="samples of class y labelled y")
    if classifier_accuracy is not None:
        ax_acc.axhline(100 * classifier_accuracy, color="gray", ls="--", lw=1,
                       label=f"classifier on real held-out ({100 * classifier_accuracy:.1f}%)")
    ax_trade.plot(accuracy, fid, "o-", color="C0")
    for x, y, scale in zip(accuracy, fid, s):
        ax_trade.annotate(f"s = {scale:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    net, n = rows[0]["feature_net"], rows[0]["num_samples"]
    ax_fid.set(xlabel="guidance scale s", ylabel=f"FID ({net} features)", title=f"FID vs s ({n} samples)")
    ax_kid.set(xlabel="guidance scale s", ylabel="KID × 10³", title="KID vs s")
    ax_acc.set(xlabel="guidance scale s", ylabel="class accuracy (%)", title="class accuracy vs s", ylim=(0, 102))
    ax_trade.set(xlabel="class accuracy (%)", ylabel="FID", title="trade-off")
    for ax in (ax_fid, ax_kid, ax_acc, ax_trade):
        ax.grid(alpha=0.3)
    for ax in (ax_fid, ax_kid, ax_acc):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
