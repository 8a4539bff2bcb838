"""Ingest and loader throughput on a synthetic folder of 32x32 RGB PNGs (generated into a temp dir).

Rows (each against a baseline measured in the same run, interleaved rounds, medians):
1. ingest: `run_ingest` (Ray Data, all cores) vs a single-process loop doing the same work per image (read, decode,
   validate, convert with the same functions, split by the same hash) into `webdataset.ShardWriter` shards.
2. loader: `WebDatasetBatches` (the default training loader) vs a plain `torch.utils.data.DataLoader`
   (num_workers=0, the same single process) over the same PNG images decoded per item.
3. loader: Ray Data `read_webdataset` → `iter_torch_batches` vs the same DataLoader (the alternative path).
4. loader: `WebDatasetBatches` with its decoded-shard cache warm (every epoch after the first, as in training)
   vs a DataLoader over the same images already decoded into memory tensors.

Usage: python -m benchmarks.ingest [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import Row, emit, interleaved  # noqa: E402
from pipelines.ingest.config import IngestConfig  # noqa: E402
from pipelines.ingest.images import RejectedImage, image_bytes_to_png  # noqa: E402
from pipelines.ingest.shards import assign_split  # noqa: E402

SIZE, BATCH, CLASSES = 32, 256, 10


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    """n 32x32 RGB PNGs in CLASSES subfolders: smooth random colour fields plus noise (compress like photos)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.uniform(0, 255, (3, 3))
        field = a[:, 0, None, None] + a[:, 1, None, None] * xx + a[:, 2, None, None] * yy
        pixels = np.clip(field.transpose(1, 2, 0) / 2 + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % CLASSES}" / f"{i:06d}.png", compress_level=6)


def config_for(src: Path) -> IngestConfig:
    return IngestConfig.model_validate({"source": {"kind": "folder", "path": str(src)},
                                        "image": {"size": SIZE, "channels": 3}})


def ray_ingest_rate(src: Path, out: Path, n: int) -> float:
    from pipelines.ingest.stage import run_ingest

    start = time.perf_counter()
    result = run_ingest(config_for(src), out, progress=False)
    seconds = time.perf_counter() - start
    assert not result.reused and sum(result.num_samples.values()) == n
    shutil.rmtree(out)
    return n / seconds


def baseline_ingest_rate(src: Path, out: Path, n: int) -> float:
    """Single process: list, read, decode+validate+convert (same functions), split, webdataset.ShardWriter."""
    import webdataset as wds

    cfg = config_for(src)
    start = time.perf_counter()
    files = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs)
    classes = sorted({f.split("/", 1)[0] for f in files})
    out.mkdir(parents=True)
    writers = {s: wds.ShardWriter(str(out / f"{s}-%06d.tar"), maxcount=1000, verbose=0)
               for s in ("train", "val", "test")}
    written = 0
    for rel in files:
        with open(src / rel, "rb") as f:
            data = f.read()
        try:
            png = image_bytes_to_png(data, cfg.image.size, cfg.image.channels, cfg.image.resize)
        except RejectedImage:
            continue
        key = rel.replace("/", "_").replace(".", "_")
        split = assign_split(key, cfg.split.val, cfg.split.test, cfg.split.seed)
        writers[split].write({"__key__": key, "png": png, "cls": str(classes.index(rel.split("/", 1)[0]))})
        written += 1
    for writer in writers.values():
        writer.close()
    seconds = time.perf_counter() - start
    assert written == n
    shutil.rmtree(out)
    return n / seconds


class PngFolder(torch.utils.data.Dataset):
    """Map-style dataset over PNG files: item i → (float32 [C, H, W] in [−1, 1], label)."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as image:
            pixels = torch.from_numpy(np.asarray(image))
        return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0), int(self.files[i].parent.name[5:])


def epoch_rate(batches) -> float:
    start, seen = time.perf_counter(), 0
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch["image"]
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (~1 min)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--images", type=int, default=None, help="images to generate (default 20000)")
    args = parser.parse_args()
    n = args.images or 20_000
    rounds = 1 if args.quick else 3

    import ray

    from pipelines.ingest.reader import WebDatasetBatches, ray_image_dataset, shard_urls
    from pipelines.ingest.stage import run_ingest

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            make_folder(tmp / "src", n)
            print(f"generated {n} PNGs of {SIZE}x{SIZE} in {time.perf_counter() - start:.1f} s", flush=True)
            counter = iter(range(10**6))
            ray_ingest_rate(tmp / "src", tmp / "warm", n)  # warm Ray Data workers (imports) once
            ingest = interleaved({
                "ray": lambda: ray_ingest_rate(tmp / "src", tmp / f"ray{next(counter)}", n),
                "loop": lambda: baseline_ingest_rate(tmp / "src", tmp / f"loop{next(counter)}", n),
            }, rounds)

            train_dir = run_ingest(config_for(tmp / "src"), tmp / "shards", progress=False).splits["train"]
            urls = shard_urls(train_dir)
            keys = {Path(p).name for p in urls}
            files = sorted(tmp.joinpath("src").rglob("*.png"))
            from pipelines.ingest.reader import load_split_tensor

            decoded, labels = load_split_tensor(train_dir)
            files = files[: len(decoded)]  # the same number of images on both sides
            epoch = iter(range(10**6))

            def ours() -> float:
                loader = WebDatasetBatches(urls, BATCH, seed=0)
                loader.set_epoch(next(epoch))
                return epoch_rate(loader)

            cached = WebDatasetBatches(urls, BATCH, seed=0, cache_mb=4096)
            epoch_rate(cached)  # the first epoch decodes and fills the cache

            def ours_cached() -> float:
                cached.set_epoch(next(epoch))
                return epoch_rate(cached)

            ray_ds = ray_image_dataset(train_dir)
            loaders = interleaved({
                "wds": ours,
                "wds_cached": ours_cached,
                "ray_data": lambda: epoch_rate(ray_ds.iter_torch_batches(
                    batch_size=BATCH, drop_last=True, local_shuffle_buffer_size=2000, local_shuffle_seed=0)),
                "dataloader": lambda: epoch_rate(torch.utils.data.DataLoader(
                    PngFolder(files), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=0)),
                "in_memory": lambda: epoch_rate(torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(decoded, labels), batch_size=BATCH, shuffle=True, drop_last=True)),
            }, rounds + 1)
            print(f"loader: {len(decoded)} train images in {len(keys)} shards", flush=True)
    finally:
        ray.shutdown()

    cores = os.cpu_count()
    rows = [
        Row(f"ingest {n} PNGs: Ray Data ({cores} cores) vs 1-process wds.ShardWriter loop", ingest["ray"],
            ingest["loop"], "img/s", "≥ 1.5x"),
        Row("loader: WebDatasetBatches vs torch DataLoader (PNG files, 0 workers)", loaders["wds"],
            loaders["dataloader"], "img/s", "≥ 0.9x"),
        Row("loader: Ray Data iter_torch_batches vs torch DataLoader (same; the alternative to the default)",
            loaders["ray_data"], loaders["dataloader"], "img/s", "-"),
        Row("loader: WebDatasetBatches, decoded cache warm vs DataLoader over decoded tensors in memory",
            loaders["wds_cached"], loaders["in_memory"], "img/s", "≥ 0.9x"),
    ]
    emit(rows, args.json, "ingest + loader throughput")


if __name__ == "__main__":
    main()
