"""The docs against the code. docs/reference/ must be what `python -m docs.generate` writes now (every pipeline key,
command, option and sampler that exists, and nothing else); the hand-written pages (README.md, docs/*.md) may only
name keys, commands, options and samplers that exist, their YAML must validate, and their links must resolve.
When this fails after a change to the code, run `python -m docs.generate` and fix the pages it names."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from diffusion.sampler_specs import SAMPLER_NAMES
from docs.generate import commands, known_keys, stale_pages
from pipelines.kinds import KINDS, load_kind
from pipelines.spec import GENERIC_STAGE_FIELDS, SpecError, build_spec

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED_KEY = re.compile(r"^(?:stages\.)?([a-z_]+(?:\.[a-z_0-9]+)+)$")
FILE_SUFFIX = re.compile(r"\.(py|md|json|ya?ml|toml|png|csv|txt|mmd|log|safetensors|pth?|bin|npz|npy|tar|gz|html)$")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_blocks(text: str, *languages: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in languages]


def prose_spans(text: str) -> list[str]:
    return SPAN.findall(FENCE.sub("", text))


def test_the_reference_pages_are_written_from_the_current_code():
    assert not stale_pages(), f"docs/reference/{stale_pages()} out of date: run python -m docs.generate"


def test_every_command_is_in_the_hand_written_docs():
    text = "\n".join(page.read_text() for page in PAGES)
    assert [c for c in commands() if f"raydiff {c}" not in text] == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_yaml_in_the_docs_validates(page):
    """Whole pipeline files go through the spec; stage fragments through their kind's parameter model."""
    errors = []
    for block in code_blocks(page.read_text(), "yaml"):
        raw = yaml.safe_load(block)
        if "stages" in raw:
            try:
                build_spec(raw)
            except SpecError as error:
                errors.extend(error.errors)
            continue
        for name, stage in raw.items():
            params = {k: v for k, v in stage.items() if k not in GENERIC_STAGE_FIELDS}
            try:
                load_kind(stage.get("kind", name)).params_model().model_validate(params)
            except ValueError as error:
                errors.append(f"{name}: {error}")
    assert errors == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_config_keys_named_in_the_docs_exist(page):
    """`train.model.preset`, `stages.train.lr: …` and keys written relative to their stage (`model.prediction`)."""
    keys = known_keys()
    first_parts = {key.split(".")[1] for key in keys if key.split(".")[0] in KINDS and "." in key}
    unknown = []
    for span in prose_spans(page.read_text()):
        key, _, rest = span.partition(":")
        match = DOTTED_KEY.match(key.strip())
        if not match or FILE_SUFFIX.search(key) or "unknown" in rest:
            continue
        key = match.group(1)
        head = key.split(".")[0]
        if head in KINDS or head in ("tracking", "storage", "cluster"):
            found = key in keys or any(key.startswith(k + ".") for k in keys if k.endswith(("search", "tags")))
        elif head in first_parts:
            found = any(k.endswith("." + key) for k in keys)
        else:
            continue
        if not found:
            unknown.append(span)
    assert unknown == []


def _command_lines(text: str) -> list[list[str]]:
    """Argument lists of the `raydiff …` (and `make run ARGS=…`) command lines in bash blocks."""
    found = []
    for block in code_blocks(text, "bash", ""):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0].strip())
            if words[:1] in (["raydiff"], [".venv/bin/raydiff"]):
                found.append(words[1:])
            elif words[:2] == ["make", "run"]:
                extra = [w.split("=", 1)[1] for w in words[2:] if w.startswith("ARGS=")]
                found.append(["run", *(shlex.split(extra[0]) if extra else [])])
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_command_lines_in_the_docs_parse(page):
    """Command lines in code blocks parse with the real parser; inline `raydiff CMD [--opt …]` name real options."""
    parsers = commands()
    text = page.read_text()
    for args in _command_lines(text):
        try:
            parsers[args[0]].parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{page_id(page)}: `raydiff {shlex.join(args)}` does not parse")
    for span in prose_spans(text):
        for words in (part.split() for part in span.split(", ") if part.startswith(("raydiff ", "make run"))):
            command = words[1] if words[0] == "raydiff" else "run"
            assert command in parsers, f"{page_id(page)}: no command raydiff {command}"
            options = {s for action in parsers[command]._actions for s in action.option_strings}
            named = {w.strip("[]\"'").split("=")[0] for w in words if w.strip("[]\"'").startswith("-")}
            assert named <= options, f"{page_id(page)}: `{span}` names {sorted(named - options)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_samplers_named_in_the_docs_exist(page):
    text = page.read_text()
    named = re.findall(r"--sampler (\S+)", text) + re.findall(r'"sampler": "([^"]+)"', text)
    named += [s.rsplit("-", 1)[0] for block in re.findall(r"samplers: \[([^\]]*)\]", text) for s in block.split(", ")]
    assert sorted(set(named) - set(SAMPLER_NAMES)) == []


def test_the_samplers_page_lists_every_sampler_and_no_other():
    table = re.findall(r"^\| `([a-z0-9-]+)` \|", (ROOT / "docs" / "samplers.md").read_text(), re.M)
    assert table == list(SAMPLER_NAMES)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    assert [t for t in targets if not (page.parent / t).exists()] == []


def test_the_readme_fits_a_screen():
    """What it is, the two commands, what you get, links; everything else lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 120
