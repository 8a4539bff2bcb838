"""The reference pages under docs/reference/, written from the code: every pipeline key (the pydantic models of the
file's top level and of each stage kind), every CLI command and option (the argparse parser, plug-in commands
included) and every sampler (the catalog `diffusion.sampler_specs`).

    python -m docs.generate            # rewrite docs/reference/*.md (from the repository root)
    python -m docs.generate --check    # exit 1, naming the stale pages, when they differ from the code

It lives beside the pages rather than in `pipelines/` because it reads the CLI, which nothing in `pipelines/` imports.

tests/test_docs.py runs the check, and holds the hand-written pages to the same names.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from diffusion.sampler_specs import SAMPLER_SPECS
from pipelines.kinds import KINDS, load_kind
from pipelines.spec import ClusterSpec, PipelineFile, Resources, StorageSpec, TrackingSpec

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "docs" / "reference"
HEADER = "<!-- Written by `python -m docs.generate` from the code; edit the code, then run it again. -->\n\n"
TOP_LEVEL = {"tracking": TrackingSpec, "storage": StorageSpec, "cluster": ClusterSpec}
GENERIC_STAGE_KEYS = {
    "kind": ("str", "the stage's name", "a built-in kind (" + ", ".join(KINDS) + ") or `package.module:NAME`"),
    "needs": ("list[str]", "[]", "stages that must finish first; a stage's inputs come from them and their ancestors"),
    "retries": ("int ≥ 0", "0", "attempts after a failed one"),
}
FIELD_DOC = re.compile(r"^(\w+)\s{2,}(\S.*)$")


# ---- pipeline keys ---------------------------------------------------------------------------------------------


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(str(v) for v in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return re.sub(r"\b(?:typing|pipelines)(?:\.\w+)*\.(\w+)\b", r"\1", str(annotation))


def _constraints(metadata: list) -> str:
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥"}
    parts = [f"{sign} {getattr(m, attr)}" for m in metadata for attr, sign in signs.items()
             if getattr(m, attr, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return ""
    return json.dumps(value, ensure_ascii=False, default=str)


def _docstring_fields(model: type[BaseModel]) -> dict[str, str]:
    """`name   explanation` lines of a model's docstring (continuation lines indented further)."""
    found, current = {}, None
    for line in inspect.cleandoc(model.__doc__ or "").splitlines():
        match = FIELD_DOC.match(line)
        if match and match.group(1) in model.model_fields:
            current = match.group(1)
            found[current] = match.group(2)
        elif current and line.startswith(" ") and line.strip():
            found[current] += " " + line.strip()
        else:
            current = None
    return found


def _nested_models(annotation) -> list[type[BaseModel]]:
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]


def model_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every field, nested models flattened with dotted paths; a field
    holding another stage kind's parameters refers to that kind's table instead."""
    other_kinds = {load_kind(k).params_model(): k for k in KINDS}
    described = _docstring_fields(model)
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_models(field.annotation)
        description = (field.description or described.get(name, "")).replace("|", "\\|")
        if nested and nested[0] in other_kinds and nested[0] is not model:
            rows.append((key, "mapping", "", f"the {other_kinds[nested[0]]} stage's keys (below)"))
            continue
        rows.append((key, _type_name(field.annotation) + _constraints(field.metadata), _default(field), description))
        for sub in nested:
            rows.extend(model_rows(sub, f"{key}."))
    return rows


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def key_rows() -> dict[str, list[tuple[str, str, str, str]]]:
    """Section → rows; keys of a stage kind are relative to the stage (`train.model.preset` is `model.preset`)."""
    sections = {"top level": [(k, "mapping" if k in TOP_LEVEL else _type_name(f.annotation), _default(f),
                               f.description or "")
                              for k, f in PipelineFile.model_fields.items()]}
    for name, model in TOP_LEVEL.items():
        sections[name] = model_rows(model, f"{name}.")
    sections["every stage"] = [(k, *v) for k, v in GENERIC_STAGE_KEYS.items()] + model_rows(Resources, "resources.")
    for kind in KINDS:
        sections[kind] = model_rows(load_kind(kind).params_model())
    return sections


def known_keys() -> set[str]:
    """Every key path a pipeline file can hold: `tracking.uri`, `train.model.preset` (stage keys under their kind)."""
    sections = key_rows()
    keys = {row[0] for rows in (sections[s] for s in ("top level", *TOP_LEVEL)) for row in rows}
    for kind in KINDS:
        keys |= {f"{kind}.{row[0]}" for row in sections[kind] + sections["every stage"]}
    return keys


def pipeline_reference() -> str:
    parts = [HEADER + "# Pipeline file keys\n\nEvery key a pipeline file accepts; anything else is an error naming its "
             "path. A stage's keys are its kind's (`kind:` defaults to the stage's name) plus those every stage "
             "has. See [the pipeline file](../pipeline.md) for how the file works."]
    for section, rows in key_rows().items():
        title = f"`stages.<name>` of kind `{section}`" if section in KINDS else section
        parts.append(f"## {title}\n\n" + _table(rows, ("key", "type", "default", "what")))
    return "\n\n".join(parts) + "\n"


# ---- CLI ---------------------------------------------------------------------------------------------------------


def commands() -> dict[str, argparse.ArgumentParser]:
    """Command name → its parser, the plug-in commands of the `raydiff.commands` entry points included."""
    from pipelines.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _command_help() -> dict[str, str]:
    from pipelines.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help or "" for choice in sub._choices_actions}


def _option_row(action: argparse.Action) -> tuple[str, str, str]:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
    default = action.default
    shown = "" if default in (None, False, [], argparse.SUPPRESS) else f"`{default}`"
    choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
    return names, shown, ((action.help or "") + choices).replace("|", "\\|")


def cli_reference() -> str:
    parts = [HEADER + "# Commands\n\n`raydiff COMMAND --help` prints the same. `serve` and `sample` (and any other "
             "command a package adds) come from the `raydiff.commands` entry points."]
    helps = _command_help()
    for name, parser in commands().items():
        rows = [_option_row(a) for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        table = _table(rows, ("argument", "default", "what")) if rows else "No arguments."
        parts.append(f"## `raydiff {name}`\n\n{helps.get(name, '')}\n\n{table}")
    return "\n\n".join(parts) + "\n"


# ---- samplers ------------------------------------------------------------------------------------------------


def samplers_reference() -> str:
    parts = [HEADER + "# Samplers\n\nThe catalog `diffusion.sampler_specs`: what the endpoint, the page, the CLI and "
             "the evaluate stage accept. In a pipeline's `evaluate.samplers` a sampler is written `NAME-STEPS` "
             "(`ddim-50`). See [samplers](../samplers.md) for what each one does."]
    for spec in SAMPLER_SPECS.values():
        steps = "all T" if spec.default_steps is None else str(spec.default_steps)
        rows = [(f"`{name}`", f"`{json.dumps(option.default)}`",
                 (f"one of {', '.join(map(str, option.choices))}" if option.choices else
                  f"in [{option.ge}, {option.le}]" if option.ge is not None or option.le is not None else ""),
                 option.description) for name, option in spec.options.items()]
        parts.append(f"## `{spec.name}`\n\n{spec.description} ({spec.paper}). Default steps: {steps}; model calls "
                     f"for 10 steps with default options: {spec.model_calls(10)}.\n\n"
                     + _table(rows, ("option", "default", "values", "what")))
    return "\n\n".join(parts) + "\n"


# ---- writing -----------------------------------------------------------------------------------------------------


def pages() -> dict[str, str]:
    return {"pipeline-keys.md": pipeline_reference(), "cli.md": cli_reference(), "samplers.md": samplers_reference()}


def stale_pages(directory: Path = REFERENCE_DIR) -> list[str]:
    return [name for name, text in pages().items()
            if not (directory / name).exists() or (directory / name).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report pages that differ from the code")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for name in stale:
            print(f"docs/reference/{name} is out of date: run python -m docs.generate", file=sys.stderr)
        return 1 if stale else 0
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (REFERENCE_DIR / name).write_text(text)
        print(f"wrote docs/reference/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
