"""The stage graph: checks (missing inputs, cycles, unfillable roles), execution order, and drawings of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.spec import PipelineSpec, StageSpec


def find_cycle(needs: dict[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (only edges to known stages are followed)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for upstream in needs[node]:
            if upstream not in needs:
                continue
            if state.get(upstream) == 1:
                return path[path.index(upstream):] + [upstream]
            if upstream not in state:
                found = visit(upstream)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(needs):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def topological_order(needs: dict[str, tuple[str, ...]]) -> list[str]:
    """Stages with all their needs before them; ties broken by file order (Kahn's algorithm)."""
    remaining = {name: set(deps) for name, deps in needs.items()}
    order: list[str] = []
    while remaining:
        ready = [name for name, deps in remaining.items() if not deps]
        if not ready:
            raise ValueError(f"cycle among {sorted(remaining)}")
        for name in ready:
            order.append(name)
            del remaining[name]
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def resolve_inputs(stages: dict[str, "StageSpec"], name: str) -> dict[str, str]:
    """role → upstream stage for `name`: per role, the nearest ancestor whose kind fills it (breadth-first from the
    direct needs). Raises ValueError when a role has no candidate or two equally near ones."""
    from pipelines.stages import load_kind

    stage = stages[name]
    kinds = {n: load_kind(s.kind).name for n, s in stages.items()}
    resolved: dict[str, str] = {}
    for role, accepted in load_kind(stage.kind).inputs.items():
        frontier, seen, found = list(stage.needs), set(stage.needs), []
        while frontier and not found:
            found = [n for n in frontier if kinds[n] in accepted]
            if not found:
                nxt = [u for n in frontier for u in stages[n].needs if u not in seen]
                seen.update(nxt)
                frontier = list(dict.fromkeys(nxt))
        if not found:
            raise ValueError(f"stages.{name}: needs a {' or '.join(accepted)} stage upstream (for its {role!r} input); "
                             f"add one to its needs")
        if len(found) > 1:
            raise ValueError(f"stages.{name}: {found} are equally near upstream {'/'.join(accepted)} stages for its "
                             f"{role!r} input; list the one to use directly in needs")
        resolved[role] = found[0]
    return resolved


def check_graph(stages: dict[str, "StageSpec"]) -> list[str]:
    errors = []
    for name, stage in stages.items():
        for upstream in stage.needs:
            if upstream == name:
                errors.append(f"stages.{name}.needs: a stage cannot need itself")
            elif upstream not in stages:
                errors.append(f"stages.{name}.needs: unknown stage {upstream!r} (stages: {sorted(stages)})")
    cycle = find_cycle({n: tuple(u for u in s.needs if u != n) for n, s in stages.items()})
    if cycle:
        errors.append(f"stages: cycle {' -> '.join(cycle)}")
    if errors:
        return errors
    for name in stages:
        try:
            resolve_inputs(stages, name)
        except ValueError as error:
            errors.append(str(error))
    return errors


def stage_order(spec: "PipelineSpec") -> list[str]:
    return topological_order({n: s.needs for n, s in spec.stages.items()})


# ---- drawings ---------------------------------------------------------------------------------------------------


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
