"""The stage graph: checks (missing inputs, cycles, unfillable roles) and execution order.

Works on any mapping of stage name → stage with `kind` and `needs` (pipelines.spec.StageSpec), so the spec can run
these checks while it validates a file; drawings of the graph are in pipelines.dag_render.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from pipelines.kinds import load_kind


class Stage(Protocol):
    kind: str
    needs: tuple[str, ...]


class Pipeline(Protocol):
    stages: Mapping[str, Stage]


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


def resolve_inputs(stages: Mapping[str, Stage], name: str) -> dict[str, str]:
    """role → upstream stage for `name`: per role, the nearest ancestor whose kind fills it (breadth-first from the
    direct needs). Raises ValueError when a role has no candidate or two equally near ones."""
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


def check_graph(stages: Mapping[str, Stage]) -> list[str]:
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


def stage_order(spec: Pipeline) -> list[str]:
    return topological_order({n: s.needs for n, s in spec.stages.items()})
