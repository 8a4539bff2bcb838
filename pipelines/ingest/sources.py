"""Sources: enumerate a source into small picklable work units, fingerprint it, and expand one unit into raw
records inside a Ray task.

A raw record is `(key, label, origin, data)`: `key` a webdataset-safe sample key, `label` an int or -1,
`origin` what a human would look for (a path, a row), `data` encoded image bytes, a uint8 pixel array (H, W[, C]),
or a `RejectedImage` when the input could not even be read.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipelines.hashing import sha256_file
from pipelines.ingest.config import SourceConfig
from pipelines.ingest.images import RejectedImage

Record = tuple[str, int, str, Any]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class SourceError(ValueError):
    """The source as a whole is unusable (missing path, wrong layout, missing column)."""


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


# ---------------------------------------------------------------- planning (driver side)


class SourcePlan:
    """Everything the driver knows about a source before any image is decoded."""

    def __init__(self, fingerprint: str, units: list[dict], num_inputs: int, classes: list[str] | None):
        self.fingerprint = fingerprint      # sha256 hex of the source's content (or of names+sizes+mtimes for folders)
        self.units = units                  # picklable work units, each expanded by `expand_unit` in a Ray task
        self.num_inputs = num_inputs        # inputs in the source, rejects included
        self.classes = classes              # class names indexed by label, None when unknown


def plan_source(source: SourceConfig, parallelism: int, scratch: Path) -> SourcePlan:
    """Enumerate `source` into work units sized for `parallelism` tasks; `scratch` may hold extracted archives."""
    if source.kind == "sklearn_digits":
        return _plan_digits(parallelism)
    path = Path(source.path).expanduser()
    if not path.exists():
        raise SourceError(f"source.path {path} does not exist (source.kind={source.kind!r})")
    if source.kind == "folder":
        return _plan_folder(path, parallelism)
    if source.kind == "parquet":
        return _plan_table(path, source)
    return _plan_cifar10(path, parallelism, scratch)


def _plan_digits(parallelism: int) -> SourcePlan:
    images, labels = _digits()
    unit_size = unit_size_for(len(images), parallelism)
    digest = hashlib.sha256(b"sklearn_digits\0" + images.tobytes() + labels.tobytes()).hexdigest()
    units = [{"kind": "digits", "start": a, "stop": b} for a, b in _chunks(len(images), unit_size)]
    return SourcePlan(digest, units, len(images), [str(i) for i in range(10)])


def _plan_folder(root: Path, parallelism: int) -> SourcePlan:
    if not root.is_dir():
        raise SourceError(f"source.path {root} is not a folder (source.kind='folder')")
    entries: list[tuple[str, os.stat_result | None]] = []
    prefix = len(str(root).rstrip(os.sep)) + 1
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(directory, name)
            try:
                stat = os.stat(full)
            except OSError:
                stat = None  # broken link, vanished file: read (and rejected) in the task
            entries.append((full[prefix:].replace(os.sep, "/"), stat))
    entries.sort(key=lambda e: e[0])
    if not entries:
        raise SourceError(f"source.path {root} holds no files")
    classes = sorted({rel.split("/", 1)[0] for rel, _ in entries if "/" in rel}) or None
    index = {name: i for i, name in enumerate(classes or [])}
    digest, seen, rows = hashlib.sha256(b"folder\0"), set(), []
    for rel, stat in entries:
        digest.update(f"{rel}\0{stat.st_size if stat else -1}\0{stat.st_mtime_ns if stat else -1}\n".encode())
        key = _UNSAFE.sub("_", rel)
        if key in seen:
            key = f"{key}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        seen.add(key)
        rows.append((key, index[rel.split("/", 1)[0]] if "/" in rel else -1, rel))
    unit_size = unit_size_for(len(rows), parallelism)
    units = [{"kind": "files", "root": str(root.resolve()), "entries": rows[a:b]}
             for a, b in _chunks(len(rows), unit_size)]
    return SourcePlan(digest.hexdigest(), units, len(rows), classes)


def _table_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".parquet", ".arrow", ".feather", ".ipc"))
    if not files:
        raise SourceError(f"source.path {path} holds no .parquet/.arrow/.feather files")
    return files


def _open_table(path: Path):
    """(kind, reader) for a Parquet or Arrow IPC (file or stream) table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] == b"PAR1":
        return "parquet", pq.ParquetFile(path)
    if magic == b"ARROW1":
        return "arrow", pa.ipc.open_file(path)
    try:
        return "arrow_stream", pa.ipc.open_stream(path).read_all()
    except pa.ArrowInvalid:
        raise SourceError(f"{path} is neither Parquet nor Arrow IPC") from None


def _plan_table(path: Path, source: SourceConfig) -> SourcePlan:
    units, offset, digest, has_label = [], 0, hashlib.sha256(b"table\0"), None
    for file in _table_files(path):
        sha256_file(file, digest)
        kind, reader = _open_table(file)
        schema = reader.schema_arrow if kind == "parquet" else reader.schema
        if source.image_column not in schema.names:
            raise SourceError(f"{file}: no image column {source.image_column!r} (source.image_column); "
                              f"columns are {schema.names}")
        file_has_label = bool(source.label_column) and source.label_column in schema.names
        has_label = file_has_label if has_label is None else has_label and file_has_label
        if kind == "parquet":
            parts = [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)]
        elif kind == "arrow":
            parts = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
        else:
            parts = [reader.num_rows]
        for part, rows in enumerate(parts):
            units.append({"kind": kind, "file": str(file.resolve()), "part": part, "offset": offset, "stem": file.stem,
                          "image_column": source.image_column, "label_column": source.label_column})
            offset += rows
    for unit in units:
        unit["has_label"] = bool(has_label)
    return SourcePlan(digest.hexdigest(), units, offset, None)


def _plan_cifar10(path: Path, parallelism: int, scratch: Path) -> SourcePlan:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if path.is_file():
        digest = sha256_file(path, hashlib.sha256(b"cifar10\0")).hexdigest()
        try:
            with tarfile.open(path, "r:*") as archive:
                members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise SourceError(f"{path}: not a CIFAR-10 python archive, missing {missing}")
                batch_dir = scratch / "cifar-10-batches-py"
                batch_dir.mkdir(parents=True, exist_ok=True)
                for name in names:
                    (batch_dir / name).write_bytes(archive.extractfile(members[name]).read())
        except tarfile.TarError as exc:
            raise SourceError(f"{path}: cannot read CIFAR-10 archive: {exc}") from None
    else:
        batch_dir = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        missing = [n for n in names if not (batch_dir / n).is_file()]
        if missing:
            raise SourceError(f"{batch_dir}: not a CIFAR-10 python folder, missing {missing}")
        digest = hashlib.sha256(b"cifar10\0")
        for name in names:
            sha256_file(batch_dir / name, digest)
        digest = digest.hexdigest()
    units, total, unit_size = [], 0, unit_size_for(60000, parallelism)
    for name in names:
        with open(batch_dir / name, "rb") as f:
            count = len(pickle.load(f, encoding="bytes")[b"labels"])
        official = "test" if name == "test_batch" else "train"  # the paper's 50,000 / 10,000 split
        units += [{"kind": "cifar10", "file": str(batch_dir / name), "name": name, "start": a, "stop": b,
                   "official_split": official} for a, b in _chunks(count, unit_size)]
        total += count
    return SourcePlan(digest, units, total, list(CIFAR10_CLASSES))


# ---------------------------------------------------------------- expansion (inside Ray tasks)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as uint8 (1797, 8, 8) scaled round(v * 255 / 16), and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=2)
def _cifar_batch(file: str) -> tuple[np.ndarray, list[int]]:
    with open(file, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), list(batch[b"labels"])


def _read_file(root: str, rel: str) -> bytes | RejectedImage:
    try:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()
    except OSError as exc:
        return RejectedImage(f"unreadable: {exc.strerror or exc.__class__.__name__}")


def _cell_bytes(value: Any) -> bytes | RejectedImage:
    if isinstance(value, dict):  # Hugging Face style {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value is None:
        return RejectedImage("image cell is null")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return RejectedImage(f"image cell is {type(value).__name__}, not bytes")


def _table_rows(unit: dict) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_col, label_col = unit["image_column"], unit["label_column"] if unit["has_label"] else None
    columns = [image_col] + ([label_col] if label_col else [])
    if unit["kind"] == "parquet":
        table = pq.ParquetFile(unit["file"]).read_row_group(unit["part"], columns=columns)
    elif unit["kind"] == "arrow":
        table = pa.Table.from_batches([pa.ipc.open_file(unit["file"]).get_batch(unit["part"])]).select(columns)
    else:
        table = pa.ipc.open_stream(unit["file"]).read_all().select(columns)
    images = table.column(image_col).to_pylist()
    labels = table.column(label_col).to_pylist() if label_col else [None] * len(images)
    for i, (cell, label) in enumerate(zip(images, labels)):
        row = unit["offset"] + i
        yield (f"{_UNSAFE.sub('_', unit['stem'])}-{row:08d}", -1 if label is None else int(label),
               f"{unit['file']}#row={row}", _cell_bytes(cell))


def expand_unit(unit: dict) -> Iterator[Record]:
    """One work unit → its raw records, in a fixed order."""
    kind = unit["kind"]
    if kind == "digits":
        images, labels = _digits()
        for i in range(unit["start"], unit["stop"]):
            yield f"digits-{i:05d}", int(labels[i]), f"sklearn_digits[{i}]", images[i]
    elif kind == "files":
        for key, label, rel in unit["entries"]:
            yield key, label, rel, _read_file(unit["root"], rel)
    elif kind == "cifar10":
        data, labels = _cifar_batch(unit["file"])
        for i in range(unit["start"], unit["stop"]):
            yield (f"cifar10-{unit['name']}-{i:05d}", int(labels[i]), f"{unit['name']}[{i}]",
                   np.ascontiguousarray(data[i].transpose(1, 2, 0)))
    else:
        yield from _table_rows(unit)


def unit_size_for(num_inputs: int, parallelism: int) -> int:
    """Inputs per work unit: enough units to keep `parallelism` tasks busy and a progress bar moving."""
    return int(min(2000, max(64, math.ceil(num_inputs / (8 * parallelism)))))
