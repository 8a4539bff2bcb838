"""infra/compose: the team's shared MLflow (Postgres + MinIO + MLflow), checked structurally without Docker.

Compose's variable interpolation is reproduced here (`${VAR}`, `${VAR:-default}`, `${VAR:?message}`, `$$`), so the
checks look at what `docker compose up` would run with the values of .env.example.
"""

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "infra" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL|ROOT_USER|_USER$", re.I)
REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
ONLY_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(node, env: dict[str, str]):
    """What Compose does to every string of the file before using it."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group(1) or match.group(4), match.group(2), match.group(3)
        value = env.get(name)
        if operator == ":-":
            return value if value else argument
        if operator == "-":
            return value if value is not None else argument
        if operator in (":?", "?") and not value:
            raise ValueError(f"{name}: {argument}")
        return value or ""

    return REFERENCE.sub(substitute, node)


def references(node) -> set[str]:
    text = yaml.safe_dump(node)
    return {m.group(1) or m.group(4) for m in REFERENCE.finditer(text) if m.group(0) != "$$"}


def compose_with_example_env() -> dict:
    return interpolate(raw_compose(), env_example())


def flags(command: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in command if arg.startswith("--"))


def test_compose_file_has_postgres_minio_buckets_and_mlflow():
    services = raw_compose()["services"]
    assert {"postgres", "minio", "create-buckets", "mlflow"} <= set(services)
    for name, service in services.items():
        assert "image" in service, f"service {name} names no image"
        assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image tag"


def test_mlflow_starts_after_its_stores_are_ready():
    depends = raw_compose()["services"]["mlflow"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["minio"]["condition"] == "service_healthy"
    assert depends["create-buckets"]["condition"] == "service_completed_successfully"
    assert raw_compose()["services"]["create-buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in ("postgres", "minio", "mlflow"):
        assert raw_compose()["services"][name]["healthcheck"]["test"], f"{name} needs a healthcheck"


def test_mlflow_server_runs_on_postgres_and_the_minio_bucket():
    env = env_example()
    services = compose_with_example_env()["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    options = flags(mlflow["command"])
    assert options["--host"] == "0.0.0.0" and options["--port"] == "5000"
    backend = urlparse(options["--backend-store-uri"])
    assert backend.scheme == "postgresql" and backend.hostname == "postgres" and backend.port == 5432
    postgres = services["postgres"]["environment"]
    assert (backend.username, backend.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    assert backend.path == "/" + postgres["POSTGRES_DB"]
    artifacts = urlparse(options["--artifacts-destination"])
    assert artifacts.scheme == "s3" and artifacts.netloc == env["MLFLOW_BUCKET"]
    creator = services["create-buckets"]
    created = re.findall(r"store/\$(\w+)", creator["command"][0])
    assert env["MLFLOW_BUCKET"] in {creator["environment"][var] for var in created}, "MLflow's bucket is never created"
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (mlflow["environment"]["AWS_ACCESS_KEY_ID"], mlflow["environment"]["AWS_SECRET_ACCESS_KEY"]) == \
        (services["minio"]["environment"]["MINIO_ROOT_USER"], services["minio"]["environment"]["MINIO_ROOT_PASSWORD"])
    health = " ".join(mlflow["healthcheck"]["test"])
    assert "http://localhost:5000/health" in health


def test_published_ports_default_to_the_documented_ones():
    defaults = {key: "" for key in env_example()} | {"POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p",
                                                      "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p"}
    services = interpolate(raw_compose(), defaults)["services"]
    assert "5000:5000" in services["mlflow"]["ports"]
    assert "9000:9000" in services["minio"]["ports"] and "9001:9001" in services["minio"]["ports"]
    assert not services["postgres"].get("ports"), "Postgres stays on the compose network"
    readme = (ROOT / "infra" / "README.md").read_text()
    assert "export MLFLOW_TRACKING_URI=http://localhost:5000" in readme


def test_no_secret_is_inlined_in_the_compose_file():
    for name, service in raw_compose()["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: write environment as a mapping"
        for key, value in environment.items():
            if SECRET_LIKE.search(key):
                assert isinstance(value, str) and ONLY_REFERENCE.match(value), \
                    f"{name}: {key} must be a ${{VAR}} reference to .env, not {value!r}"
        text = yaml.safe_dump(service)
        for user, password in re.findall(r"://([^/\s:@]+):([^/\s@]+)@", text):
            assert ONLY_REFERENCE.match(user) and ONLY_REFERENCE.match(password), \
                f"{name}: credentials written into a URL"


def test_every_variable_is_documented_in_env_example_and_secrets_are_placeholders():
    example = env_example()
    used = references(raw_compose())  # `$$VAR` (the container's own environment) is no reference
    assert used <= set(example), f".env.example lacks {sorted(used - set(example))}"
    assert set(example) <= used, f".env.example sets unused variables {sorted(set(example) - used)}"
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required and required <= set(example)
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value == "change-me", f".env.example {key} must be a placeholder, not a real credential"
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        interpolate(raw_compose(), {k: v for k, v in example.items() if k != "POSTGRES_PASSWORD"})


def test_real_env_file_is_git_ignored():
    ignored = (COMPOSE_DIR / ".gitignore").read_text().split()
    assert ".env" in ignored
