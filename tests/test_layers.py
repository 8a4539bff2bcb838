"""The layer rule of README "Layout" (DESIGN.md's table), checked on every import statement in the tree, including
imports inside functions: diffusion/ imports only torch, numpy, safetensors (diffusers in interop.py) and the
standard library; pipelines/ and services/ never import each other; inside pipelines/ only the runner and the CLI
import the runner; the HTTP ingress never loads torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("diffusion", "pipelines", "services")
STDLIB = set(sys.stdlib_module_names)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.append((node.lineno, node.module))
    return found


def files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def violations(layer: str, allowed) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in files(layer)
            for line, name in imports(path) if not allowed(path, name)]


def test_every_layer_has_files():
    assert all(files(layer) for layer in LAYERS)


def test_diffusion_imports_only_torch_numpy_and_the_standard_library():
    def allowed(path, name):
        optional = {"diffusers"} if path.name == "interop.py" else set()  # DESIGN.md: diffusers only in interop
        return name.split(".")[0] in {"diffusion", "torch", "numpy", "safetensors", "__future__"} | optional | STDLIB

    assert violations("diffusion", allowed) == []


@pytest.mark.parametrize("layer, sibling", [("pipelines", "services"), ("services", "pipelines")])
def test_pipelines_and_services_never_import_each_other(layer, sibling):
    assert violations(layer, lambda path, name: name.split(".")[0] != sibling) == []


def test_only_the_runner_and_the_cli_import_the_runner():
    top = {ROOT / "pipelines" / "cli.py"}

    def allowed(path, name):
        upward = name.startswith(("pipelines.runner", "pipelines.cli"))
        return not upward or path in top or "runner" in path.relative_to(ROOT / "pipelines").parts

    assert violations("pipelines", allowed) == []


def test_the_http_ingress_loads_no_torch():
    code = "import sys, services.ingress, services.schemas, services.page; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_checker_sees_lazy_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    from services.app import build_app\n")
    assert (4, "services.app") in imports(sample)
