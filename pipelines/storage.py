"""Where stage outputs live: a local directory or any pyarrow.fs URI (s3://bucket/prefix?endpoint_override=host:9000
for MinIO and other S3-compatible stores).

Stage functions work on local paths. With a local root a stage writes straight into its output directory; with a
remote root it writes into a local scratch directory that is uploaded when the stage succeeds, and downstream
stages download what they read into a local cache (`RAYDIFF_CACHE_DIR`, default ~/.cache/raydiff/artifacts) on the
node that reads it. Long stages also write to storage as they go (training: its MLflow run id at once and Ray Train's
checkpoints, see `filesystem`), so a stage restarted on another node finds them.

S3 credentials and endpoint come from the URI's query (`endpoint_override`, `scheme`, `region`, …, as pyarrow reads
them) or from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION).
"""

from __future__ import annotations

import fcntl
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


def parent_uri(uri: str) -> str:
    """The directory holding `uri`, a remote URI keeping its query."""
    if not is_remote(uri):
        return str(Path(uri).parent)
    parsed = urlparse(uri)
    return parsed._replace(path=parsed.path.rsplit("/", 1)[0]).geturl()


def uri_name(uri: str) -> str:
    """The last part of a path or URI (a remote URI's query left out)."""
    return Path(urlparse(uri).path if is_remote(uri) else uri).name


def local_cache_dir() -> Path:
    return Path(os.environ.get("RAYDIFF_CACHE_DIR", Path.home() / ".cache" / "raydiff" / "artifacts"))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a remote URI (what Ray Train's `storage_filesystem`
    and `storage_path` take)."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(urlparse(uri).path if uri.startswith("file://") else uri).resolve())
    return pafs.FileSystem.from_uri(uri)


def localize(uri: str) -> Path:
    """A local copy of the directory at `uri` on this node (the path itself when it is local).

    Downloads once per node into the local cache; processes on one node that localize the same URI at the same time
    (two training workers) wait for one download under a file lock."""
    if not is_remote(uri):
        return Path(urlparse(uri).path if uri.startswith("file://") else uri)
    target = local_cache_dir() / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    done = target.with_suffix(".done")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            fs, path = filesystem(uri)
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                raise FileNotFoundError(f"{uri} is not a directory in storage")
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            done.write_text(uri)
    return target


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

    def read_text(self, uri: str) -> str | None:
        """The file's text, or None when there is no file at `uri`."""
        fs, path = filesystem(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def read_json(self, uri: str) -> dict | None:
        text = self.read_text(uri)
        return None if text is None else json.loads(text)

    def write_json(self, uri: str, data: dict) -> None:
        self.write_text(uri, json.dumps(data, indent=2, sort_keys=True, default=str))

    def write_text(self, uri: str, text: str) -> None:
        """Atomic on local disks (write, then rename) and on object stores (a PUT is)."""
        fs, path = filesystem(uri)
        payload = text.encode()
        if not is_remote(uri):
            tmp = f"{path}.tmp{os.getpid()}"
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).write_bytes(payload)
            os.replace(tmp, path)
            return
        with fs.open_output_stream(path) as stream:
            stream.write(payload)

    def delete_dir(self, uri: str) -> None:
        fs, path = filesystem(uri)
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
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def localize(self, uri: str) -> Path:
        """A local copy of the directory at `uri` (the path itself when it is local)."""
        return localize(uri)
