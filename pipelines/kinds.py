"""The stage-kind registry: a stage's `kind:` is one of KINDS or "package.module:NAME" naming a `StageKind` elsewhere.

Each built-in kind lives in its own folder, `pipelines/<kind>/`, with its `KIND` in `stage.py`.
"""

from __future__ import annotations

import importlib

from pipelines.stage import StageKind

KINDS = {
    "ingest": "pipelines.ingest.stage:KIND",
    "train": "pipelines.train.stage:KIND",
    "sweep": "pipelines.sweep.stage:KIND",
    "distill": "pipelines.distill.stage:KIND",
    "evaluate": "pipelines.evaluate.stage:KIND",
    "register": "pipelines.register.stage:KIND",
    "deploy": "pipelines.deploy.stage:KIND",
}


class KindError(ValueError):
    pass


def load_kind(ref: str) -> StageKind:
    target = KINDS.get(ref, ref)
    if ":" not in target:
        raise KindError(f"unknown stage kind {ref!r}; known kinds: {sorted(KINDS)} (or 'package.module:NAME')")
    module_name, _, attr = target.partition(":")
    try:
        kind = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise KindError(f"cannot load stage kind {ref!r}: {error}") from None
    if not isinstance(kind, StageKind):
        raise KindError(f"{ref!r} is a {type(kind).__name__}, not a StageKind")
    return kind
