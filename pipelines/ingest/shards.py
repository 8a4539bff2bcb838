"""Deterministic split assignment and tar shards (GNU tar, members of a sample adjacent).

A sample's tar members are serialised where the image is encoded (`sample_tar_bytes`, in Ray tasks), so the
writer only appends bytes and hashes them. Shards are byte-for-byte reproducible: fixed member order (`KEY.png`
then `KEY.cls`), mtime 0, uid/gid 0, mode 0644, no user names.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
_END = b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker


def assign_split(key: str, val: float, test: float, seed: int, official: str | None = None) -> str:
    """"train" / "val" / "test" from a stable hash of (seed, key): the same key always lands in the same split.

    `official`: the split the source itself puts the sample in (CIFAR-10's test_batch is "test", its data batches
    "train"): an official test sample stays in test, an official train sample goes to train or val (no test draw)."""
    if official == "test":
        return "test"
    if official == "train":
        test = 0.0
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < test else "val" if u < test + val else "train"


def _tarinfo_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = bytearray(_tarinfo_header("x", 0))
_TEMPLATE[0:100] = bytes(100)
_TEMPLATE[148:156] = b" " * 8  # checksum field counts as spaces while summing


def _header(name: str, size: int) -> bytes:
    """The GNU tar header `tarfile` writes for a regular file (mode 0644, mtime 0, root), built ~10x faster."""
    encoded = name.encode()
    if len(encoded) >= 100 or size >= 8**11:  # long name or >= 8 GiB: let tarfile add its extension records
        return _tarinfo_header(name, size)
    header = _TEMPLATE.copy()
    header[0:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def sample_tar_bytes(key: str, png: bytes, label: int) -> bytes:
    """The tar members of one sample: `KEY.png` (uint8 image) and, when label >= 0, `KEY.cls` (decimal ASCII)."""
    blob = _member(f"{key}.png", png)
    return blob + _member(f"{key}.cls", str(int(label)).encode()) if label >= 0 else blob


@dataclass
class ShardInfo:
    file: str
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Writes samples of one split into `{prefix}-{index:06d}.tar`, starting a new shard when the current one holds
    `max_samples` samples or the next sample would take the finished file past `max_bytes` bytes."""

    def __init__(self, directory: Path, prefix: str, max_samples: int | None, max_bytes: int | None):
        self.directory, self.prefix = Path(directory), prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[ShardInfo] = []
        self._file = None

    @staticmethod
    def _finished_size(size: int) -> int:
        """File size once the end marker and the padding to a whole tar record are written."""
        return -(-(size + len(_END)) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = open(self.directory / self._name, "wb", buffering=1 << 20)
        self._sha, self._size, self._count = hashlib.sha256(), 0, 0

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._size += len(data)

    def _close(self) -> None:
        if self._file is None:
            return
        self._append(_END + b"\0" * (self._finished_size(self._size) - self._size - len(_END)))
        self._file.close()
        self.shards.append(ShardInfo(self._name, self._count, self._size, self._sha.hexdigest()))
        self._file = None

    def _full(self, pending: int, extra: int) -> bool:
        """Whether one more sample of `extra` bytes must start a new shard, with `pending` bytes not yet written."""
        if self._count == 0:
            return False
        if self.max_samples is not None and self._count >= self.max_samples:
            return True
        return self.max_bytes is not None and self._finished_size(self._size + pending + extra) > self.max_bytes

    def write(self, blob: bytes) -> None:
        """Append one sample's members (from `sample_tar_bytes`)."""
        self.write_many(blob, [len(blob)])

    def write_many(self, blob: bytes | memoryview, sizes: list[int]) -> None:
        """Append consecutive samples given as one concatenated blob plus each sample's byte length; each run of
        samples that fits in the current shard is written with one call."""
        view, pos, run_start = memoryview(blob), 0, 0
        for size in sizes:
            if self._file is None or self._full(pos - run_start, size):
                if pos > run_start:
                    self._append(view[run_start:pos])
                self._close()
                self._open()
                run_start = pos
            self._count += 1
            pos += size
        if pos > run_start:
            self._append(view[run_start:pos])

    def close(self) -> list[ShardInfo]:
        """Finish the last shard; the list of shards written, in order."""
        self._close()
        return self.shards
