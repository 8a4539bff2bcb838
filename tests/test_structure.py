"""The structure rules of DESIGN.md / the style guide, beside the layer test: no import cycle among the modules of
diffusion/, pipelines/ and services/ (imports inside functions count, and importing a submodule runs its package's
__init__ first), and no function longer than 60 lines there."""

import ast
from pathlib import Path

from tests.test_layers import LAYERS, ROOT, files, imports

MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports (an imported name that is a module counts as that module; importing
    a.b.c also runs a and a.b)."""
    modules = {module_name(path): path for layer in LAYERS for path in files(layer)}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        targets |= {target for _, target in imports(path)}
        closed = set()
        for target in targets:
            parts = target.split(".")
            closed |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
        graph[name] = {target for target in closed if target in modules and target != name
                       and not name.startswith(target + ".")}  # a module never waits for its own package
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (its modules, first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for layer in LAYERS:
        for path in files(layer):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_cycles_through_packages_and_lazy_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert {"diffusion.samplers", "diffusion.samplers.base"} <= graph["diffusion.guidance"]  # the package runs first
    assert "diffusion.samplers" not in graph["diffusion.samplers.loop"]  # but not for its own modules
    assert "diffusion.samplers.guidance" in graph["diffusion.samplers.loop"]


def test_no_function_over_60_lines():
    assert long_functions() == []
