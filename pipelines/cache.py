"""Content-addressed stage caching.

A stage's key is sha256(kind, code version, parameters, the content hashes of its inputs). Its outputs live in
`<storage root>/stages/<kind>-<key[:KEY_CHARS]>/`; the record `raydiff-stage.json` is written there last, so a
directory without one is an unfinished run of that exact stage (a training run to resume), and a directory with
one is a cache hit. Resources and retries are not part of the key: they do not change what a stage computes.
"""

from __future__ import annotations

import hashlib
import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines.hashing import hash_json, sha256_file
from pipelines.stage import StageKind, StageRecord
from pipelines.storage import join_uri

KEY_CHARS = 20
RECORD_FILE = "raydiff-stage.json"


@lru_cache(maxsize=None)
def _source_files(module_name: str) -> tuple[Path, ...]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__path__"):  # a package: all its .py files
        return tuple(sorted(p for root in module.__path__ for p in Path(root).rglob("*.py")))
    return (Path(module.__file__),)


def code_version(kind: StageKind) -> str:
    """sha256 of the source text of the kind's adapter module and of every module/package in `kind.code`."""
    modules = dict.fromkeys([kind.run.__module__, *kind.code])
    digest = hashlib.sha256()
    for module_name in modules:
        for path in _source_files(module_name):
            digest.update(f"{module_name}:{path.name}\0".encode())
            sha256_file(path, digest)
    return digest.hexdigest()


def stage_key(kind: StageKind, params: dict[str, Any], input_hashes: dict[str, str]) -> str:
    """input_hashes: upstream stage name → that stage's output content hash."""
    payload = {"kind": kind.name, "code": code_version(kind), "params": params, "inputs": input_hashes}
    return hash_json(payload)


def stage_dir_name(kind: StageKind, key: str) -> str:
    return f"{kind.name}-{key[:KEY_CHARS]}"


def read_record(storage, stage_uri: str) -> StageRecord | None:
    data = storage.read_json(join_uri(stage_uri, RECORD_FILE))
    return StageRecord.from_json(data) if data is not None else None


def write_record(storage, record: StageRecord) -> None:
    storage.write_json(join_uri(record.uri, RECORD_FILE), record.to_json())
