"""Pipeline files: validation with key paths, ${var} and --set overrides, graph errors — all before anything runs."""

from pathlib import Path

import pytest

from pipelines.dag import resolve_inputs, stage_order
from pipelines.dag_render import render_mermaid, render_text
from pipelines.spec import SpecError, build_spec, load_spec, parse_yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = "tests.pipelines.test_dag_runner:SOURCE"
SUM = "tests.pipelines.test_dag_runner:SUM"


def spec_of(text: str, sets=()):
    return build_spec(parse_yaml(text), list(sets))


def errors_of(text: str, sets=()) -> list[str]:
    with pytest.raises(SpecError) as caught:
        spec_of(text, sets)
    return caught.value.errors


VALID = f"""
name: toy
vars: {{v: 3, tag: abc}}
stages:
  a: {{kind: "{SRC}", value: "${{v}}", log: "/tmp/${{tag}}-log", resources: {{num_cpus: 0.5}}, retries: 2}}
  b: {{kind: "{SUM}", needs: [a], log: x}}
"""


def test_valid_spec_with_vars_and_generic_fields():
    spec = spec_of(VALID)
    a = spec.stages["a"]
    assert a.params.value == 3 and a.params.log == "/tmp/abc-log"  # a whole-string ${v} keeps the var's type
    assert a.resources.num_cpus == 0.5 and a.retries == 2 and a.needs == ()
    assert spec.stages["b"].needs == ("a",) and spec.stages["b"].params.value == 0
    assert spec.tracking.experiment == "raydiff" and spec.storage.root == ".raydiff"
    assert stage_order(spec) == ["a", "b"] and resolve_inputs(spec.stages, "b") == {"first": "a"}
    resolved = spec.resolved()["stages"]
    assert resolved["b"] == {"kind": SUM, "needs": ["a"], "retries": 0, "resources": {}, "value": 0, "note": "",
                             "sleep": 0.0, "meet": [], "fail_times": 0, "log": "x"}


def test_overrides_set_vars_stage_fields_and_top_level_fields():
    spec = spec_of(VALID, ["v=7", "b.value=5", "a.retries=0", "tracking.experiment=exp2", "storage.root=/s3"])
    assert spec.stages["a"].params.value == 7 and spec.stages["b"].params.value == 5
    assert spec.stages["a"].retries == 0 and spec.tracking.experiment == "exp2" and spec.storage.root == "/s3"
    assert spec.overrides == ("v=7", "b.value=5", "a.retries=0", "tracking.experiment=exp2", "storage.root=/s3")


@pytest.mark.parametrize("sets, message", [
    (["b.valu=5"], "stages.b.valu: unknown key"),
    (["nope=1"], "'nope' is neither a var"),
    (["b.value"], "expected KEY=VALUE"),
    (["b.value=abc"], "stages.b.value: Input should be a valid integer"),
])
def test_bad_overrides_name_the_problem(sets, message):
    assert any(message in e for e in errors_of(VALID, sets)), errors_of(VALID, sets)


def test_unknown_keys_are_reported_with_their_paths_all_at_once():
    errors = errors_of(f"""
name: toy
trackin: {{uri: x}}
cluster: {{address: local, cpus: 4}}
stages:
  a: {{kind: "{SRC}", log: x, valeu: 1, resources: {{cpu: 1}}}}
""")
    assert "trackin: unknown key" in errors
    assert "cluster.cpus: unknown key" in errors


def test_stage_level_errors_are_collected_across_stages():
    errors = errors_of(f"""
name: toy
stages:
  a: {{kind: "{SRC}", log: x, valeu: 1, resources: {{cpu: 1}}}}
  b: {{kind: "{SUM}", needs: [a], log: x, retries: -1, value: [1]}}
""")
    assert "stages.a.resources.cpu: unknown key" in errors
    assert "stages.a.valeu: unknown key" in errors
    assert any(e.startswith("stages.b.retries: expected a non-negative integer") for e in errors)


def test_missing_inputs_and_self_needs():
    errors = errors_of(f"""
name: toy
stages:
  a: {{kind: "{SRC}", log: x, needs: [a]}}
  b: {{kind: "{SUM}", needs: [ghost], log: x}}
""")
    assert "stages.a.needs: a stage cannot need itself" in errors
    assert any(e.startswith("stages.b.needs: unknown stage 'ghost'") for e in errors)


def test_cycles_are_named():
    errors = errors_of(f"""
name: toy
stages:
  a: {{kind: "{SRC}", log: x}}
  b: {{kind: "{SUM}", needs: [a, d], log: x}}
  c: {{kind: "{SUM}", needs: [b], log: x}}
  d: {{kind: "{SUM}", needs: [c], log: x}}
""")
    assert errors == ["stages: cycle b -> d -> c -> b"]


def test_duplicate_stage_names_are_an_error_not_last_one_wins():
    errors = errors_of(f"""
name: toy
stages:
  a: {{kind: "{SRC}", log: x}}
  a: {{kind: "{SRC}", log: y}}
""")
    assert errors == ["line 5: duplicate key 'a' (first defined on line 4)"]


def test_unfillable_input_role_and_unknown_kind():
    errors = errors_of(f"""
name: toy
stages:
  b: {{kind: "{SUM}", log: x}}
  c: {{kind: transmogrify}}
""")
    assert any(e.startswith("stages.c.kind: unknown stage kind 'transmogrify'") for e in errors)
    errors = errors_of(f"name: toy\nstages:\n  b: {{kind: \"{SUM}\", log: x}}\n")
    assert errors == ["stages.b: needs a source or sum stage upstream (for its 'first' input); add one to its needs"]


def test_unknown_variable_and_empty_pipeline():
    assert errors_of(f"name: toy\nstages:\n  a: {{kind: \"{SRC}\", log: '${{nope}}'}}\n") == [
        "stages.a.log: unknown variable ${nope} (vars: none declared)"]
    assert any(e.startswith("stages:") for e in errors_of("name: toy\nstages: {}\n"))
    assert errors_of("name: [") [0].startswith("not valid YAML")


def test_nearest_upstream_fills_a_role_and_ambiguity_is_an_error():
    spec = spec_of(f"""
name: toy
stages:
  a: {{kind: "{SRC}", log: x}}
  b: {{kind: "{SUM}", needs: [a], log: x}}
  c: {{kind: "{SUM}", needs: [b], log: x}}
""")
    assert resolve_inputs(spec.stages, "c") == {"first": "b"}
    errors = errors_of(f"""
name: toy
stages:
  a: {{kind: "{SRC}", log: x}}
  a2: {{kind: "{SRC}", log: x}}
  b: {{kind: "{SUM}", needs: [a, a2], log: x}}
""")
    assert errors == ["stages.b: ['a', 'a2'] are equally near upstream source/sum stages for its 'first' input; "
                      "list the one to use directly in needs"]


def test_shipped_configs_validate_and_draw():
    local = load_spec(ROOT / "configs" / "local.yaml")
    assert list(local.stages) == ["ingest", "train", "evaluate", "register", "deploy"]
    assert resolve_inputs(local.stages, "evaluate") == {"model": "train", "data": "ingest"}
    assert local.stages["train"].resources.num_cpus == 0 and local.cluster.num_cpus == 4
    assert "register --> deploy" in render_mermaid(local)
    assert "evaluate (evaluate)" not in render_text(local) and "evaluate <- train" in render_text(local)
    gpu = load_spec(ROOT / "configs" / "cifar10-gpu.yaml", ["cifar10_archive=/x/cifar.tar.gz"])
    train = gpu.stages["train"].params
    assert (train.steps, train.batch_size, train.workers, train.use_gpu) == (800_000, 128, 8, True)
    assert train.model.preset == "cifar10" and gpu.tracking.uri == "http://raydiff-mlflow:5000"
    assert gpu.stages["ingest"].params.source.path == "/x/cifar.tar.gz"


def test_a_sweep_feeds_evaluate_register_and_deploy_like_a_train_stage():
    raw = parse_yaml((ROOT / "configs" / "sweep-local.yaml").read_text())
    raw["stages"]["register"] = {"needs": ["evaluate"], "model_name": "digits-sweep",
                                 "promote_if": {"metric": "test_bpd", "mode": "min"}}
    raw["stages"]["deploy"] = {"needs": ["register"], "route": "/"}
    spec = build_spec(raw)
    assert resolve_inputs(spec.stages, "evaluate")["model"] == "sweep"
    assert resolve_inputs(spec.stages, "register") == {"model": "sweep", "evaluation": "evaluate"}
    assert resolve_inputs(spec.stages, "deploy") == {"model": "register"}


def test_the_commented_distill_stages_of_the_local_config_validate_when_uncommented():
    """configs/local.yaml ships a distill → evaluate → register chain commented out (off by default)."""
    lines = (ROOT / "configs" / "local.yaml").read_text().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("  # distill:"))
    text = "\n".join(lines[:start] + [line.replace("  # ", "  ", 1) for line in lines[start:]])
    spec = build_spec(parse_yaml(text))
    assert list(spec.stages)[-3:] == ["distill", "evaluate-student", "register-student"]
    assert resolve_inputs(spec.stages, "distill") == {"model": "train", "data": "ingest"}
    assert resolve_inputs(spec.stages, "evaluate-student") == {"model": "distill", "data": "ingest"}
    assert resolve_inputs(spec.stages, "register-student") == {"model": "distill", "evaluation": "evaluate-student"}
    assert spec.stages["distill"].params.rounds == [32, 16, 8, 4]
