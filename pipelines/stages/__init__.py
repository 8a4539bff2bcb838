"""Stage kinds: thin adapters from the pipeline runner to the stage functions (ingest, train, evaluate, ...).

A stage's `kind:` is one of KINDS or "package.module:NAME" naming a `StageKind` object elsewhere.
"""

from __future__ import annotations

import importlib

from pipelines.stages.kind import StageKind

KINDS = {
    "ingest": "pipelines.stages.ingest:KIND",
    "train": "pipelines.stages.train:KIND",
    "evaluate": "pipelines.stages.evaluate:KIND",
    "register": "pipelines.stages.register:KIND",
    "deploy": "pipelines.stages.deploy:KIND",
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
