"""`manifest.json` beside each split's shards: what was ingested, from where, and how to check it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipelines.hashing import sha256_file

MANIFEST = "manifest.json"
FORMAT = "raydiff-webdataset/1"


class ShardIntegrityError(RuntimeError):
    """A shard is missing or its sha256 differs from the manifest's."""


class ManifestError(ValueError):
    """A split directory has no (readable) manifest."""


def write_manifest(split_dir: Path, manifest: dict) -> Path:
    path = Path(split_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_manifest(split_dir: str | Path) -> dict:
    """The parsed manifest.json of `split_dir`; keys: format, split, fingerprint, source, image, num_samples,
    shards [{file, samples, bytes, sha256}], classes, rejects [{key, origin, reason}], num_rejected."""
    path = Path(split_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: {split_dir} is not an ingested split directory") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_shards(split_dir: str | Path) -> dict:
    """Check every shard listed in the manifest against its sha256 and size; returns the manifest.

    Raises ShardIntegrityError naming the shard file, the expected and the actual sha256.
    """
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    for shard in manifest["shards"]:
        path = split_dir / shard["file"]
        if not path.is_file():
            raise ShardIntegrityError(f"shard {path} listed in {split_dir / MANIFEST} is missing")
        actual = sha256_file(path).hexdigest()
        if actual != shard["sha256"]:
            raise ShardIntegrityError(f"shard {path} is corrupt or was modified: sha256 {actual}, "
                                      f"manifest expects {shard['sha256']}")
    return manifest


def verify_stored_shards(split_uri: str) -> tuple[dict, list[str]]:
    """The manifest of a split in (possibly remote) storage and its shards' paths on that storage's filesystem, every
    shard's sha256 checked by streaming it from storage. Raises like verify_shards."""
    from pipelines.storage import Storage, filesystem, join_uri

    manifest = Storage(split_uri).read_json(join_uri(split_uri, MANIFEST))
    if manifest is None or manifest.get("format") != FORMAT:
        raise ManifestError(f"{join_uri(split_uri, MANIFEST)} is missing or not a {FORMAT} manifest")
    fs, root = filesystem(split_uri)
    paths = []
    for shard in manifest["shards"]:
        path = f"{root.rstrip('/')}/{shard['file']}"
        digest = hashlib.sha256()
        try:
            with fs.open_input_stream(path) as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            raise ShardIntegrityError(f"shard {shard['file']} listed in {split_uri} is missing") from None
        if digest.hexdigest() != shard["sha256"]:
            raise ShardIntegrityError(f"shard {shard['file']} of {split_uri} is corrupt or was modified: sha256 "
                                      f"{digest.hexdigest()}, manifest expects {shard['sha256']}")
        paths.append(path)
    return manifest, paths
