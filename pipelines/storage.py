"""Where stage outputs live: a local directory or any pyarrow.fs URI (s3://bucket/prefix?endpoint_override=host:9000
for MinIO and other S3-compatible stores).

Stage functions work on local paths. With a local root a stage writes straight into its output directory; with a
remote root it writes into a local scratch directory that is uploaded when the stage succeeds, and downstream
stages download what they read into a local cache (`RAYDIFF_CACHE_DIR`, default ~/.cache/raydiff/artifacts).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"  # a one-letter scheme is a Windows drive


def join_uri(uri: str, *parts: str) -> str:
    """`uri`/part/…, keeping a remote URI's query (s3://b/p?endpoint_override=… → s3://b/p/part?endpoint_override=…)."""
    if not is_remote(uri):
        return str(Path(uri, *parts))
    parsed = urlparse(uri)
    return parsed._replace(path="/".join([parsed.path.rstrip("/"), *parts])).geturl()


def local_cache_dir() -> Path:
    return Path(os.environ.get("RAYDIFF_CACHE_DIR", Path.home() / ".cache" / "raydiff" / "artifacts"))


class Storage:
    def __init__(self, root: str):
        if is_remote(root):
            self.root = root.rstrip("/")
        else:
            path = urlparse(root).path if root.startswith("file://") else root
            self.root = str(Path(path).expanduser().resolve())
        self.remote = is_remote(self.root)

    def uri(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def _fs(self, uri: str) -> tuple[pafs.FileSystem, str]:
        if not is_remote(uri):
            return pafs.LocalFileSystem(), uri
        return pafs.FileSystem.from_uri(uri)

    def read_json(self, uri: str) -> dict | None:
        fs, path = self._fs(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())

    def write_json(self, uri: str, data: dict) -> None:
        """Atomic on local disks (write, then rename) and on object stores (a PUT is)."""
        fs, path = self._fs(uri)
        payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        if not self.remote:
            tmp = f"{path}.tmp{os.getpid()}"
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).write_bytes(payload)
            os.replace(tmp, path)
            return
        with fs.open_output_stream(path) as stream:
            stream.write(payload)

    def delete_dir(self, uri: str) -> None:
        fs, path = self._fs(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)

    def work_dir(self, uri: str) -> Path:
        """The local directory a stage writes its outputs into (the output dir itself when storage is local)."""
        if not self.remote:
            return Path(uri)
        return local_cache_dir() / "work" / hashlib.sha256(uri.encode()).hexdigest()[:24]

    def publish(self, local_dir: Path, uri: str) -> None:
        """Upload a finished stage's local outputs to `uri` (nothing to do for local storage)."""
        if not self.remote:
            return
        fs, path = self._fs(uri)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def localize(self, uri: str) -> Path:
        """A local copy of the directory at `uri` (the path itself when it is local)."""
        if not is_remote(uri):
            return Path(urlparse(uri).path if uri.startswith("file://") else uri)
        target = local_cache_dir() / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        done = target.with_suffix(".done")
        if not done.exists():
            fs, path = self._fs(uri)
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            done.write_text(uri)
        return target
