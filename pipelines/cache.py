"""Content-addressed stage caching.

A stage's key is sha256(kind, the kind's declared version, parameters, the content hashes of its inputs). The version
is a string the kind's author bumps when the kind's outputs change meaning for the same inputs: editing a comment, a
docstring or an unrelated module never changes a key, so a rerun after such a change resumes an unfinished training
in the same output directory. Its outputs live in
`<storage root>/stages/<kind>-<key[:KEY_CHARS]>/`; the record `raydiff-stage.json` is written there last, so a
directory without one is an unfinished run of that exact stage (a training run to resume), and a directory with
one is a cache hit. Resources and retries are not part of the key: they do not change what a stage computes.
"""

from __future__ import annotations

from typing import Any

from pipelines.hashing import hash_json
from pipelines.stage import StageKind, StageRecord
from pipelines.storage import join_uri

KEY_CHARS = 20
RECORD_FILE = "raydiff-stage.json"


def stage_key(kind: StageKind, params: dict[str, Any], input_hashes: dict[str, str]) -> str:
    """input_hashes: upstream stage name → that stage's output content hash."""
    payload = {"kind": kind.name, "version": kind.version, "params": params, "inputs": input_hashes}
    return hash_json(payload)


def stage_dir_name(kind: StageKind, key: str) -> str:
    return f"{kind.name}-{key[:KEY_CHARS]}"


def read_record(storage, stage_uri: str) -> StageRecord | None:
    data = storage.read_json(join_uri(stage_uri, RECORD_FILE))
    return StageRecord.from_json(data) if data is not None else None


def write_record(storage, record: StageRecord) -> None:
    storage.write_json(join_uri(record.uri, RECORD_FILE), record.to_json())
