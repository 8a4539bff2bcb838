"""Drawings of a pipeline's stage graph: plain text (`raydiff dag`), Mermaid (logged with every pipeline run) and a
PNG drawn with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.dag import resolve_inputs, stage_order

if TYPE_CHECKING:
    from pipelines.spec import PipelineSpec


def _levels(spec: "PipelineSpec") -> dict[str, int]:
    level: dict[str, int] = {}
    for name in stage_order(spec):
        level[name] = 1 + max((level[u] for u in spec.stages[name].needs), default=-1)
    return level


def render_text(spec: "PipelineSpec") -> str:
    lines = [f"pipeline {spec.name}: {len(spec.stages)} stages"]
    for name in stage_order(spec):
        stage = spec.stages[name]
        inputs = resolve_inputs(spec.stages, name)
        kind = f" ({stage.kind})" if stage.kind != name else ""
        needs = f" <- {', '.join(stage.needs)}" if stage.needs else ""
        roles = "; ".join(f"{role}={up}" for role, up in inputs.items())
        res = ", ".join(f"{k}={v:g}" for k, v in stage.resources.model_dump(exclude_none=True).items())
        extras = ", ".join(part for part in (roles, res, f"retries={stage.retries}" if stage.retries else "") if part)
        lines.append(f"  {name}{kind}{needs}" + (f"   [{extras}]" if extras else ""))
    return "\n".join(lines)


def render_mermaid(spec: "PipelineSpec") -> str:
    lines = ["flowchart LR"]
    for name in stage_order(spec):
        stage = spec.stages[name]
        lines.append(f'    {name}["{name}<br/><small>{stage.kind}</small>"]')
    for name in stage_order(spec):
        for upstream in spec.stages[name].needs:
            lines.append(f"    {upstream} --> {name}")
    return "\n".join(lines)


def render_png(spec: "PipelineSpec", path: str | Path) -> Path:
    """A left-to-right drawing with matplotlib (no graphviz needed): one column per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level = _levels(spec)
    columns: dict[int, list[str]] = {}
    for name in stage_order(spec):
        columns.setdefault(level[name], []).append(name)
    height = max(len(c) for c in columns.values())
    pos = {name: (3.0 * lvl, (height - 1) / 2 - i) for lvl, names in columns.items() for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(2.4 * len(columns) + 1, 1.2 * height + 1))
    for name, stage in spec.stages.items():
        for upstream in stage.needs:
            (x0, y0), (x1, y1) = pos[upstream], pos[name]
            ax.annotate("", xy=(x1 - 1.0, y1), xytext=(x0 + 1.0, y0),
                        arrowprops=dict(arrowstyle="->", color="#555", lw=1.4))
    for name, (x, y) in pos.items():
        label = name if spec.stages[name].kind == name else f"{name}\n({spec.stages[name].kind})"
        ax.text(x, y, label, ha="center", va="center", fontsize=10,
                bbox=dict(boxstyle="round,pad=0.5", fc="#e8f0fe", ec="#3367d6"))
    ax.set_xlim(-1.5, 3.0 * max(columns) + 1.5)
    ax.set_ylim(-height / 2 - 0.5, height / 2 + 0.5)
    ax.set_title(spec.name)
    ax.axis("off")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
