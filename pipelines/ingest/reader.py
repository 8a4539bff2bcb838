"""Training-side readers over ingested shards. All yield float32 images in [−1, 1], NCHW, and int64 labels (−1
when unknown); all check the manifest's sha256 of every shard they read before the first sample.

- `WebDatasetBatches`: the `webdataset` package's pipeline, single-process, explicit rank/world splitting,
  reproducible per-epoch shuffling, optional in-memory cache of decoded shards. The default in training (see
  README: faster per core than Ray Data here).
- `ray_image_dataset`: `ray.data.read_webdataset` → a Dataset for `TorchTrainer(datasets=...)`; workers call
  `get_dataset_shard(...).iter_torch_batches(...)`.
- `load_split_tensor`: a whole (or the first `limit` samples of a) split as two tensors, in manifest order.
"""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from pipelines.ingest.manifest import ManifestError, load_manifest, verify_shards, verify_stored_shards

_VERIFIED: set[tuple] = set()  # (manifest path, shard stats) already hashed in this process


def shard_urls(split_dir: str | Path) -> list[str]:
    """Absolute paths of the split's shards, in manifest order."""
    split_dir = Path(split_dir).resolve()
    return [str(split_dir / shard["file"]) for shard in load_manifest(split_dir)["shards"]]


def _verify_once(split_dir: Path) -> dict:
    """verify_shards(split_dir), skipped when this process already verified the same unchanged files."""
    manifest = load_manifest(split_dir)
    stats = []
    for shard in manifest["shards"]:
        try:
            st = (split_dir / shard["file"]).stat()
            stats.append((shard["file"], shard["sha256"], st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((shard["file"], None))
    token = (str(split_dir.resolve()), tuple(stats))
    if token not in _VERIFIED:
        manifest = verify_shards(split_dir)
        _VERIFIED.add(token)
    return manifest


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 array [H, W, C]."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def decode_pngs(pngs: Iterable[bytes]) -> np.ndarray:
    """PNG bytes → uint8 array [B, H, W, C] (all images must share one shape, as ingest guarantees)."""
    return np.stack([decode_png(data) for data in pngs])


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] → float32 [B, C, H, W] in [−1, 1] (x / 127.5 − 1), contiguous.

    Done in numpy, single-threaded: two passes, no intra-op thread pool to contend with training threads.
    """
    out = np.empty((images.shape[0], images.shape[3], images.shape[1], images.shape[2]), dtype=np.float32)
    np.multiply(images.transpose(0, 3, 1, 2), np.float32(1 / 127.5), out=out, casting="unsafe")
    out -= np.float32(1.0)
    return torch.from_numpy(out)


def _tar_files(src: Iterable[dict]) -> Iterator[dict]:
    """webdataset pipeline stage: {"url"} → {"fname", "data", "__url__"} per regular tar member, in file order.

    Reads a whole shard at once and parses the 512-byte headers directly (ustar, GNU long names, pax paths):
    several times faster than `tarfile` in streaming mode, which is what `wds.tarfile_to_samples` uses.
    """
    for item in src:
        url = item["url"]
        with open(url, "rb") as f:
            buf = f.read()
        pos, long_name = 0, None
        while pos + 512 <= len(buf) and buf[pos] != 0:
            header = buf[pos:pos + 512]
            try:
                size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                raise ValueError(f"shard {url}: malformed tar header at byte {pos}") from None
            kind, start = header[156:157], pos + 512
            data, pos = buf[start:start + size], start + -(-size // 512) * 512
            if kind == b"L":  # GNU long name for the next member
                long_name = data.rstrip(b"\0").decode()
            elif kind == b"x":  # pax extended header: "LEN path=NAME\n" records
                for record in data.decode().split("\n"):
                    if " path=" in record:
                        long_name = record.split(" path=", 1)[1]
            elif kind in (b"0", b"\0"):
                name = long_name or header[:100].rstrip(b"\0").decode()
                if long_name is None and header[257:263] == b"ustar\0" and header[345] != 0:
                    name = header[345:500].rstrip(b"\0").decode() + "/" + name
                long_name = None
                yield {"fname": name, "data": data, "__url__": url}
            else:
                long_name = None


def wds_samples(urls: list[str]) -> Iterator[dict]:
    """Samples {"__key__", "png", "cls"?, "__url__"} of the shards, in order (a webdataset pipeline)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys

    return iter(wds.DataPipeline(wds.SimpleShardList(urls), _tar_files, group_by_keys))


def _label(sample: dict) -> int:
    value = sample.get("cls")
    return -1 if value is None else int(value)


def _stack(items: list[tuple[bytes | np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(PNG bytes or uint8 [H, W, C], label)] → (float32 [B, C, H, W] in [−1, 1], int64 [B])."""
    payloads, labels = zip(*items)
    images = np.stack([decode_png(p) if isinstance(p, bytes) else p for p in payloads])
    return to_model_range(images), torch.tensor(labels, dtype=torch.int64)


def _shard_counts(urls: list[str], verify: bool) -> list[int]:
    """Samples per shard from the manifests beside the shards (verifying their sha256 when `verify`)."""
    counts: dict[str, int] = {}
    for directory in dict.fromkeys(str(Path(u).resolve().parent) for u in urls):
        try:
            manifest = _verify_once(Path(directory)) if verify else load_manifest(directory)
        except ManifestError as exc:
            raise ManifestError(f"WebDatasetBatches needs the manifest beside its shards: {exc}") from None
        counts.update({str(Path(directory) / s["file"]): s["samples"] for s in manifest["shards"]})
    missing = [u for u in urls if str(Path(u).resolve()) not in counts]
    if missing:
        raise ManifestError(f"shards not listed in their manifest.json: {missing[:3]}")
    return [counts[str(Path(u).resolve())] for u in urls]


class WebDatasetBatches:
    """Batches `(images float32 [B, C, H, W] in [−1, 1], labels int64 [B])` for rank `rank` of `world_size`.

    Ranks read disjoint subsets: whole shards when there are at least 4 shards per rank, otherwise every
    `world_size`-th sample of the common stream (so it works with fewer shards than ranks). Every rank yields
    the same number of samples per epoch (the smallest share), so DDP ranks take the same number of steps.
    The shard order and the sample shuffle (a `shuffle_buffer`-deep buffer) are drawn from (seed, epoch[, rank]):
    the same seed and epoch give the same batches, cached or not. Single process; iterate again after `set_epoch`.

    `cache_mb` > 0 keeps the decoded uint8 images of every shard this loader reads in memory, whole shards, until
    their total would pass `cache_mb`: those shards are neither read nor decoded again. Ranks draw new shards each
    epoch, so a rank's cache can grow to the whole split (the budget bounds it).
    """

    SHARDS_PER_RANK = 4

    def __init__(self, urls: list[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 2000, drop_last: bool = True, verify: bool = True, cache_mb: float = 0.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if not urls:
            raise ValueError("WebDatasetBatches got no shard urls")
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.urls, self.batch_size, self.seed = list(urls), int(batch_size), int(seed)
        self.rank, self.world_size, self.shuffle_buffer, self.drop_last = rank, world_size, shuffle_buffer, drop_last
        self.counts = _shard_counts(self.urls, verify)
        self.epoch = 0
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[str, tuple[np.ndarray, list[int]]] = {}  # url → (uint8 [N, H, W, C], labels)

    @property
    def cached_shards(self) -> int:
        return len(self._cache)

    def _items(self, urls: list[str]) -> Iterator[tuple[bytes | np.ndarray, int]]:
        """(PNG bytes, label) per sample in shard order; (uint8 [H, W, C], label) for shards decoded here."""
        cached_bytes = sum(images.nbytes for images, _ in self._cache.values())
        for url in urls:
            if url in self._cache:
                images, labels = self._cache[url]
                yield from zip(images, labels)
                continue
            samples = wds_samples([url])
            if cached_bytes >= self.cache_bytes:  # cache off or full: PNG bytes, decoded per batch
                yield from ((s["png"], _label(s)) for s in samples)
                continue
            samples = list(samples)
            if not samples:
                continue
            images, labels = decode_pngs(s["png"] for s in samples), [_label(s) for s in samples]
            if cached_bytes + images.nbytes <= self.cache_bytes:
                self._cache[url] = images, labels
            cached_bytes += images.nbytes
            yield from zip(images, labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plan(self) -> tuple[list[str], bool, int]:
        """(this rank's shard urls in epoch order, whether to take every world_size-th sample, samples to yield)."""
        order = list(range(len(self.urls)))
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)
        if len(order) >= self.SHARDS_PER_RANK * self.world_size:
            shares = [order[r::self.world_size] for r in range(self.world_size)]
            per_rank = min(sum(self.counts[i] for i in share) for share in shares)
            return [self.urls[i] for i in shares[self.rank]], False, per_rank
        return [self.urls[i] for i in order], self.world_size > 1, sum(self.counts) // self.world_size

    def __len__(self) -> int:
        per_rank = self._plan()[2]
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import webdataset as wds

        urls, by_sample, per_rank = self._plan()
        stages = [lambda: self._items(urls)]
        if by_sample:
            rank, world = self.rank, self.world_size
            stages.append(lambda src: itertools.islice(src, rank, None, world))
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{self.rank}")
        stages += [wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
                   lambda src: itertools.islice(src, per_rank),
                   wds.batched(self.batch_size, collation_fn=_stack, partial=not self.drop_last)]
        return iter(wds.DataPipeline(*stages))


def _ray_rows(batch: dict) -> dict:
    """Ray Data batch of raw webdataset columns → {"image": float32 [B, C, H, W] in [−1, 1], "label": int64 [B]}."""
    images = to_model_range(decode_pngs(batch["png"])).numpy()  # float32 [B, C, H, W]
    labels = batch.get("cls")
    if labels is None:
        labels = np.full(len(images), -1, dtype=np.int64)
    else:
        labels = np.array([-1 if v is None else int(v) for v in labels], dtype=np.int64)
    return {"image": images, "label": labels}


def ray_image_dataset(split_uri: str | Path):
    """The split as a `ray.data.Dataset` with columns "image" (float32 [C, H, W] in [−1, 1]) and "label" (int64).

    Reads with `ray.data.read_webdataset` (one read task per shard, on any node) after checking the shards' sha256;
    a split in remote storage is read from there, never from one node's disk.
    """
    import ray

    from pipelines.storage import filesystem, is_remote

    if is_remote(str(split_uri)):
        manifest, paths = verify_stored_shards(str(split_uri))
        fs = filesystem(str(split_uri))[0]
    else:
        manifest, paths, fs = _verify_once(Path(split_uri).resolve()), shard_urls(split_uri), None
    if not manifest["shards"]:
        raise ValueError(f"split {split_uri} holds no shards (0 samples)")
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, suffixes=["png", "cls"])
    return ds.map_batches(_ray_rows, batch_format="numpy", batch_size=256)


def load_split_tensor(split_dir: str | Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, C, H, W] in [−1, 1], labels int64 [N]) of the first `limit` (default all) samples,
    in manifest order. N = 0 gives images of shape [0, C, size, size] from the manifest's image spec."""
    split_dir = Path(split_dir).resolve()
    manifest = _verify_once(split_dir)
    urls = shard_urls(split_dir)
    samples = list(itertools.islice(wds_samples(urls), limit)) if urls and limit != 0 else []
    if not samples:
        spec = manifest["image"]
        return torch.zeros(0, spec["channels"], spec["size"], spec["size"]), torch.zeros(0, dtype=torch.int64)
    return _stack([(s["png"], _label(s)) for s in samples])
