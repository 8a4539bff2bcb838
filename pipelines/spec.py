"""The pipeline file: YAML → `${var}` substitution and `--set` overrides → a validated `PipelineSpec`.

    name: digits-local
    vars: {steps: 3000}                          # referenced as ${steps}; `--set steps=500` overrides
    tracking: {uri: sqlite:///mlruns.db, experiment: raydiff-digits}
    storage: {root: .raydiff}                    # stage outputs: a local dir or s3://bucket/prefix?endpoint_override=…
    cluster: {address: local, num_cpus: 4}
    stages:
      train: {needs: [ingest], steps: ${steps}, resources: {num_cpus: 0}, retries: 1}

Every stage has the generic fields `kind` (defaults to the stage's name), `needs`, `resources` and `retries`;
all its other keys are the parameters of its kind, validated by that kind's own pydantic model. Unknown keys
anywhere are errors that name their path (`stages.train.model.presett`). All errors are collected and raised
together as one `SpecError` before anything runs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from pipelines.dag import check_graph
from pipelines.kinds import KindError, load_kind
from pipelines.strict import StrictConfig

GENERIC_STAGE_FIELDS = ("kind", "needs", "resources", "retries")
STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
VAR = re.compile(r"\$\{([^}]*)\}")
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """An invalid pipeline file; `errors` lists every problem found, each starting with its path."""

    def __init__(self, errors: list[str], source: str = "pipeline"):
        self.errors = list(errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  {e}" for e in errors))


class TrackingSpec(StrictConfig):
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI overrides; None = sqlite:///mlruns.db")
    experiment: str = "raydiff"


class StorageSpec(StrictConfig):
    root: str = Field(".raydiff", description="where stage outputs live: a local dir (relative to the working dir) "
                                              "or a pyarrow.fs URI such as s3://bucket/prefix")


class ClusterSpec(StrictConfig):
    address: str = Field("local", description="'local' starts a Ray instance; 'auto' or ray://… attaches to one. "
                                              "RAY_ADDRESS (set inside Ray jobs) overrides")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray instance")
    num_gpus: int | None = Field(None, ge=0)


class Resources(StrictConfig):
    """What the stage's own Ray task holds. Orchestrating stages (ingest, train) hold no CPU, so the Ray Data and
    Ray Train workers they start can be scheduled."""

    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)


class PipelineFile(StrictConfig):
    """The file's top level; stages are validated separately, per kind."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    vars: dict[str, Any] = {}
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    cluster: ClusterSpec = ClusterSpec()
    stages: dict[str, dict[str, Any]] = Field(min_length=1)


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    needs: tuple[str, ...]
    resources: Resources
    retries: int
    params: BaseModel

    def params_json(self) -> dict:
        return self.params.model_dump(mode="json")


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    description: str
    tracking: TrackingSpec
    storage: StorageSpec
    cluster: ClusterSpec
    stages: dict[str, StageSpec]
    vars: dict[str, Any] = field(default_factory=dict)
    source_text: str = ""  # the file as written
    source_path: str | None = None
    overrides: tuple[str, ...] = ()

    def resolved(self) -> dict:
        """The effective configuration: every stage with all its parameters, defaults included."""
        return {
            "name": self.name, "description": self.description, "vars": self.vars,
            "tracking": self.tracking.model_dump(mode="json"), "storage": self.storage.model_dump(mode="json"),
            "cluster": self.cluster.model_dump(mode="json"),
            "stages": {s.name: {"kind": s.kind, "needs": list(s.needs), "retries": s.retries,
                                "resources": s.resources.model_dump(mode="json", exclude_none=True),
                                **s.params_json()} for s in self.stages.values()},
        }


# ---- YAML with duplicate keys rejected -----------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise SpecError([f"line {line}: duplicate key {key!r} (first defined on line {seen[key]})"])
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str = "pipeline") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except SpecError as error:
        raise SpecError(error.errors, source) from None
    except yaml.YAMLError as error:
        raise SpecError([f"not valid YAML: {error}"], source) from None


# ---- overrides and ${var} substitution -----------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`--set KEY=VALUE` (VALUE parsed as YAML): KEY names a var from `vars`, a stage path (`train.steps`, short
    for `stages.train.steps`) or a top-level path (`tracking.uri`). Missing intermediate mappings are created."""
    raw = copy.deepcopy(raw)
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(f"--set {item!r}: expected KEY=VALUE")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            errors.append(f"--set {item!r}: value is not valid YAML ({error})")
            continue
        parts = key.split(".")
        variables = raw.get("vars") if isinstance(raw.get("vars"), dict) else {}
        stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
        if len(parts) == 1 and parts[0] in variables:
            parts = ["vars", parts[0]]
        elif parts[0] in stages and parts[0] not in PipelineFile.model_fields:
            parts = ["stages", *parts]
        elif parts[0] not in PipelineFile.model_fields:
            errors.append(f"--set {key}: {parts[0]!r} is neither a var ({sorted(variables) or 'none declared'}), "
                          f"a stage ({sorted(stages)}) nor a top-level field ({sorted(PipelineFile.model_fields)})")
            continue
        target = raw
        for depth, part in enumerate(parts[:-1]):
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            if not isinstance(child, dict):
                errors.append(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a mapping")
                break
            target = child
        else:
            target[parts[-1]] = value
    if errors:
        raise SpecError(errors, "overrides")
    return raw


def substitute_vars(node: Any, variables: dict[str, Any], path: str, errors: list[str]) -> Any:
    """Replace `${name}` in strings. A string that is exactly `${name}` takes the var's value and type."""
    if isinstance(node, dict):
        return {k: substitute_vars(v, variables, f"{path}.{k}" if path else str(k), errors) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_vars(v, variables, f"{path}[{i}]", errors) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def lookup(name: str) -> Any:
        if name not in variables:
            errors.append(f"{path}: unknown variable ${{{name}}} (vars: {sorted(variables) or 'none declared'})")
            return ""
        return variables[name]

    whole = VAR.fullmatch(node)
    if whole:
        return lookup(whole.group(1))
    return VAR.sub(lambda m: str(lookup(m.group(1))), node)


# ---- validation --------------------------------------------------------------------------------------------


def format_validation_error(error: ValidationError, prefix: str) -> list[str]:
    messages = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "(top level)")
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        messages.append(f"{where}: {message}")
    return messages


def _validate_stage(name: str, raw: Any, errors: list[str]) -> StageSpec | None:
    where = f"stages.{name}"
    if not STAGE_NAME.match(str(name)):
        errors.append(f"{where}: stage names start with a letter and use letters, digits, '-' and '_'")
        return None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping of parameters, got {type(raw).__name__}")
        return None
    params = {k: v for k, v in raw.items() if k not in GENERIC_STAGE_FIELDS}
    kind_ref = raw.get("kind", name)
    count = len(errors)
    needs = raw.get("needs", [])
    if isinstance(needs, str):
        needs = [needs]
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        errors.append(f"{where}.needs: expected a list of stage names")
        needs = []
    elif len(set(needs)) != len(needs):
        errors.append(f"{where}.needs: lists {sorted({n for n in needs if needs.count(n) > 1})} more than once")
    retries = raw.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        errors.append(f"{where}.retries: expected a non-negative integer, got {retries!r}")
    try:
        resources = Resources.model_validate(raw.get("resources") or {})
    except ValidationError as error:
        errors.extend(format_validation_error(error, f"{where}.resources"))
        resources = None
    try:
        kind = load_kind(str(kind_ref))
    except KindError as error:
        errors.append(f"{where}.kind: {error}")
        return None
    try:
        model = kind.params_model()
    except (ImportError, AttributeError) as error:
        errors.append(f"{where}.kind: cannot load the parameters of kind {kind.name!r}: {error}")
        return None
    try:
        validated = model.model_validate(params)
    except ValidationError as error:
        errors.extend(format_validation_error(error, where))
        return None
    if len(errors) > count:
        return None
    return StageSpec(name=name, kind=str(kind_ref), needs=tuple(needs),
                     resources=resources.model_copy(update={k: v for k, v in kind.resources.items()
                                                            if getattr(resources, k) is None}),
                     retries=retries, params=validated)


def build_spec(raw: Any, overrides: list[str] | tuple[str, ...] = (), source: str = "pipeline", source_text: str = "",
               source_path: str | None = None) -> PipelineSpec:
    """Validate a parsed pipeline (a dict) into a PipelineSpec, including the DAG checks."""
    if not isinstance(raw, dict):
        raise SpecError([f"expected a mapping at the top level, got {type(raw).__name__}"], source)
    raw = apply_overrides(raw, overrides)
    errors: list[str] = []
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise SpecError(["vars: expected a mapping"], source)
    bad_names = [name for name in variables if not VAR_NAME.match(str(name))]
    errors += [f"vars.{name}: variable names are identifiers" for name in bad_names]
    body = substitute_vars({k: v for k, v in raw.items() if k != "vars"}, variables, "", errors)
    try:
        top = PipelineFile.model_validate({**body, "vars": variables})
    except ValidationError as error:
        errors += format_validation_error(error, "")
        raise SpecError(errors, source) from None
    stages: dict[str, StageSpec] = {}
    for name, stage_raw in top.stages.items():
        stage = _validate_stage(name, stage_raw, errors)
        if stage is not None:
            stages[name] = stage
    if not errors:
        errors += check_graph(stages)
    if errors:
        raise SpecError(errors, source)
    return PipelineSpec(name=top.name, description=top.description, tracking=top.tracking, storage=top.storage,
                        cluster=top.cluster, stages=stages, vars=dict(variables), source_text=source_text,
                        source_path=source_path, overrides=tuple(overrides))


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"no such file: {path}"], str(path))
    text = path.read_text()
    return build_spec(parse_yaml(text, str(path)), overrides, str(path), text, str(path.resolve()))
