"""Dockerfiles and .dockerignore, checked without a Docker engine: base images match the installed Ray, version pins
match pyproject.toml, and the build context carries the project but no local state or secrets."""

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra" / "docker"
RAY_DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
MLFLOW_DOCKERFILE = DOCKER / "Dockerfile.mlflow"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(name: str) -> Requirement:
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"pyproject.toml does not depend on {name}")


def exact_pin(name: str) -> str:
    (spec,) = pinned(name).specifier
    assert spec.operator == "==" and "*" not in spec.version, f"pyproject.toml must pin {name} exactly"
    return spec.version


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def base_image(path: Path) -> str:
    (image,) = [args.split()[0] for op, args in instructions(path) if op == "FROM"]
    return image


def run_text(path: Path) -> str:
    return "\n".join(args for op, args in instructions(path) if op == "RUN")


@pytest.mark.parametrize("platform", sorted(RAY_DOCKERFILES))
def test_ray_images_build_on_the_ray_image_of_the_installed_version(platform):
    path = RAY_DOCKERFILES[platform]
    repository, tag = base_image(path).split(":")
    assert repository == "rayproject/ray"
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py3(\d+)-(cpu|cu\d+)", tag)
    assert match, f"{path.name}: base tag {tag} is not VERSION-py3XY-PLATFORM"
    version, python_minor, image_platform = match.groups()
    assert version == ray.__version__, f"{path.name}: base image has Ray {version}, installed is {ray.__version__}"
    assert version in pinned("ray").specifier, f"{path.name}: Ray {version} is outside pyproject's ray pin"
    python = f"3.{python_minor}"
    assert python in SpecifierSet(pyproject()["project"]["requires-python"]), f"{path.name}: Python {python}"
    assert (image_platform == "cpu") == (platform == "cpu"), f"{path.name}: base platform {image_platform}"
    assert f"ray.__version__ == '{ray.__version__}'" in run_text(path), f"{path.name}: the build must check Ray"


@pytest.mark.parametrize("platform", sorted(RAY_DOCKERFILES))
def test_ray_images_install_the_pinned_torch_build_for_their_platform(platform):
    path = RAY_DOCKERFILES[platform]
    torch_installs = re.findall(r"pip install torch==(\S+) --index-url (\S+)", run_text(path))
    assert len(torch_installs) == 1, f"{path.name}: install torch once, pinned, from the PyTorch index"
    version, index = torch_installs[0]
    assert version == exact_pin("torch"), f"{path.name}: torch {version} != pyproject's {exact_pin('torch')}"
    image_platform = base_image(path).rsplit("-", 1)[1]
    assert index == f"https://download.pytorch.org/whl/{image_platform}", \
        f"{path.name}: torch from {index} does not match the {image_platform} base image"


@pytest.mark.parametrize("platform", sorted(RAY_DOCKERFILES))
def test_ray_images_install_the_project_at_app_with_pyprojects_dependencies(platform):
    path = RAY_DOCKERFILES[platform]
    ops = instructions(path)
    workdirs = [args for op, args in ops if op == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app", f"{path.name}: the project must live at /app"
    copies = [args for op, args in ops if op == "COPY"]
    assert any(c.split()[-2:] == [".", "."] for c in copies), f"{path.name}: must copy the project (with configs/)"
    run = run_text(path)
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in run, \
        f"{path.name}: dependencies must come from pyproject.toml"
    assert "pip install --no-deps -e ." in run
    for pin in ("mlflow", "ray", "torch"):
        for version in re.findall(rf"\b{pin}(?:\[[^\]]*\])?==([\w.*]+)", run):
            assert version in pinned(pin).specifier, f"{path.name}: {pin}=={version} contradicts pyproject.toml"


def test_mlflow_image_pins_pyprojects_mlflow_with_postgres_and_s3_drivers():
    run = run_text(MLFLOW_DOCKERFILE)
    versions = re.findall(r"\bmlflow==(\S+)", run)
    assert versions == [exact_pin("mlflow")], \
        f"Dockerfile.mlflow pins mlflow {versions}, pyproject.toml {exact_pin('mlflow')}"
    assert "psycopg2" in run and "boto3" in run
    python = re.fullmatch(r"python:3\.(\d+)-slim", base_image(MLFLOW_DOCKERFILE))
    assert python and f"3.{python.group(1)}" in SpecifierSet(pyproject()["project"]["requires-python"])


def test_manifests_and_compose_run_the_mlflow_image_of_the_pinned_version():
    tag = exact_pin("mlflow")
    deployment = next(d for d in yaml.safe_load_all((ROOT / "infra/k8s/mlflow.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f"/raydiff-mlflow:{tag}")
    compose = yaml.safe_load((ROOT / "infra/compose/docker-compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"] == f"raydiff-mlflow:{tag}"
    assert compose["services"]["mlflow"]["build"]["dockerfile"] == MLFLOW_DOCKERFILE.name


def dockerignore_matches(candidate: str, pattern: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        return fnmatch.fnmatchcase(candidate, rest) or fnmatch.fnmatchcase(candidate, "*/" + rest)
    return fnmatch.fnmatchcase(candidate, pattern)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, closely enough for these patterns: the last matching pattern wins, `!` re-includes, a
    pattern matches a path or any of its parent directories, `**/` matches any number of directories."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = (raw[1:] if negate else raw).strip("/")
        if any(dockerignore_matches(candidate, pattern) for candidate in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_project_and_drops_local_state_and_secrets():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for kept in ("pyproject.toml", "README.md", "configs/cifar10-gpu.yaml", "configs/local.yaml",
                 "diffusion/unet.py", "pipelines/cli.py", "pipelines/train/stage.py", "services/app.py",
                 "infra/serve/serve-config.yaml"):
        assert not dockerignored(kept, patterns), f".dockerignore drops {kept}, which the image needs"
    for dropped in (".venv/bin/python", ".git/HEAD", ".env", "infra/compose/.env", "configs/.env",
                    "mlruns.db", "mlruns/0/meta.yaml", "mlartifacts/1/a.png", ".raydiff/shards/x.tar",
                    "pipelines/__pycache__/cli.cpython-311.pyc", "raydiff.egg-info/PKG-INFO", ".pytest_cache/v"):
        assert dockerignored(dropped, patterns), f".dockerignore lets {dropped} into the image"


def test_dockerignore_matcher_follows_docker_semantics():
    assert dockerignored("a/b/.env", ["**/.env"]) and dockerignored(".env", ["**/.env"])
    assert not dockerignored("x/.env.example", ["**/.env.*", "!**/.env.example"])
    assert dockerignored(".venv/lib/x.py", [".venv/"]) and not dockerignored("src/.venvx", [".venv/"])
