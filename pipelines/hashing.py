"""Content hashes: of files (shards, checkpoints, manifests, source archives) and of JSON-ready values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, digest: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    """Feed the file's bytes into `digest` (a new sha256 when None) and return it; read in 1 MiB blocks."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def hash_files(paths: list[Path]) -> str:
    """sha256 over the files' names (relative order as given) and contents."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        sha256_file(path, digest)
    return digest.hexdigest()


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
