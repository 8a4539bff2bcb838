"""Readers over real shards: disjoint per-rank subsets (also inside real Ray Train workers), reproducible
shuffling, value range and layout, and checksum verification on read."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.manifest import ShardIntegrityError, load_manifest, verify_shards
from pipelines.ingest.reader import WebDatasetBatches, load_split_tensor, ray_image_dataset, shard_urls
from pipelines.ingest.stage import run_ingest

N = 48  # image i is a 4x4 gray square of value 5*i: its pixels identify it


def ingest_numbered(root: Path, samples_per_shard: int) -> Path:
    src = root / "src"
    if not src.exists():
        src.mkdir(parents=True)
        for i in range(N):
            Image.new("L", (4, 4), 5 * i).save(src / f"{i:02d}.png")
    config = IngestConfig.model_validate({"source": {"kind": "folder", "path": str(src)},
                                          "image": {"size": 4, "channels": 1}, "split": {"val": 0.0, "test": 0.0},
                                          "shard": {"samples_per_shard": samples_per_shard}})
    return run_ingest(config, root / "out", progress=False).splits["train"]


def ids(images: torch.Tensor) -> list[int]:
    """Image identities from float [B, 1, 4, 4] in [−1, 1]."""
    return [int(round((float(x[0, 0, 0]) + 1) * 127.5)) // 5 for x in images]


@pytest.fixture(scope="module")
def splits(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("numbered")
    return {"many": ingest_numbered(root, 6), "few": ingest_numbered(root, 30), "uneven": ingest_numbered(root, 5)}


@pytest.mark.parametrize("layout", ["many", "few"])  # 8 shards (split by shard) / 2 shards (split by sample)
def test_two_ranks_are_disjoint_and_cover_the_split(splits, layout):
    urls = shard_urls(splits[layout])
    seen = []
    for rank in range(2):
        loader = WebDatasetBatches(urls, batch_size=4, seed=1, rank=rank, world_size=2, shuffle_buffer=16)
        batches = list(loader)
        assert len(batches) == len(loader) == N // 2 // 4
        seen.append([i for images, _ in batches for i in ids(images)])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(N))


def test_uneven_shards_still_give_every_rank_the_same_number_of_batches(splits):
    urls = shard_urls(splits["uneven"])  # 10 shards: nine of 5 samples, one of 3
    for epoch in range(3):
        shares = []
        for rank in range(2):
            loader = WebDatasetBatches(urls, batch_size=2, seed=0, rank=rank, world_size=2, drop_last=False)
            loader.set_epoch(epoch)
            shares.append([i for images, _ in loader for i in ids(images)])
        assert len(shares[0]) == len(shares[1]) >= 20 and not set(shares[0]) & set(shares[1])


def test_shuffle_is_reproducible_per_seed_and_epoch(splits):
    def order(seed, epoch):
        loader = WebDatasetBatches(shard_urls(splits["many"]), batch_size=8, seed=seed, shuffle_buffer=20)
        loader.set_epoch(epoch)
        return [i for images, _ in loader for i in ids(images)]

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(N))
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)


def _epochs(loader: WebDatasetBatches, epochs) -> list[list]:
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.append([(ids(x), y.tolist()) for x, y in loader])
    return out


@pytest.mark.parametrize("layout", ["many", "few"])
def test_decoded_cache_gives_the_same_batches_as_decoding(splits, layout):
    urls = shard_urls(splits[layout])
    for rank in range(2):
        args = dict(batch_size=4, seed=3, rank=rank, world_size=2, shuffle_buffer=16)
        cached = WebDatasetBatches(urls, **args, cache_mb=1)
        assert _epochs(cached, range(4)) == _epochs(WebDatasetBatches(urls, **args), range(4))
        assert 0 < cached.cached_shards <= len(urls)


def test_warm_decoded_cache_reads_no_shard_file(splits, tmp_path):
    urls = shard_urls(splits["many"])
    plain = WebDatasetBatches(urls, batch_size=4, seed=3, shuffle_buffer=16)
    cached = WebDatasetBatches(urls, batch_size=4, seed=3, shuffle_buffer=16, cache_mb=1)
    expected = _epochs(plain, range(3))
    assert _epochs(cached, [0]) == expected[:1] and cached.cached_shards == len(urls)
    moved = [tmp_path / Path(u).name for u in urls]
    for url, to in zip(urls, moved):
        Path(url).rename(to)
    try:
        assert _epochs(cached, [1, 2]) == expected[1:]
        with pytest.raises(FileNotFoundError):
            list(plain)
    finally:
        for url, to in zip(urls, moved):
            to.rename(url)


def test_decoded_cache_stops_at_its_budget(splits):
    urls = shard_urls(splits["many"])  # 8 shards of 6 images of 16 bytes: 96 bytes each
    loader = WebDatasetBatches(urls, batch_size=4, seed=0, cache_mb=300 / 2**20)
    assert sorted(i for x, _ in loader for i in ids(x)) == list(range(N))
    assert loader.cached_shards == 3
    assert sorted(i for x, _ in loader for i in ids(x)) == list(range(N))
    with pytest.raises(ValueError, match="cache_mb"):
        WebDatasetBatches(urls, batch_size=4, seed=0, cache_mb=-1)


def test_tensor_layout_range_and_split_tensor(splits):
    images, labels = next(iter(WebDatasetBatches(shard_urls(splits["many"]), batch_size=8, seed=0)))
    assert images.shape == (8, 1, 4, 4) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1 and (labels == -1).all()  # no subfolders: no labels
    all_images, all_labels = load_split_tensor(splits["many"])
    assert ids(all_images) == list(range(N)) and all_labels.shape == (N,)
    assert ids(load_split_tensor(splits["many"], limit=5)[0]) == [0, 1, 2, 3, 4]
    assert float(all_images[0].min()) == -1.0 and abs(float(all_images[-1].max()) - (235 / 127.5 - 1)) < 1e-6


def test_ray_dataset_rows(splits):
    rows = ray_image_dataset(splits["many"]).take_all()
    assert len(rows) == N and rows[0]["image"].shape == (1, 4, 4) and rows[0]["image"].dtype == np.float32
    assert sorted(ids(torch.as_tensor(np.stack([r["image"] for r in rows])))) == list(range(N))
    assert all(r["label"] == -1 for r in rows)


def test_tampered_shard_is_named(ray_session, tmp_path):
    split_dir = ingest_numbered(tmp_path, 12)
    load_split_tensor(split_dir)  # verified once, cached
    shard = split_dir / load_manifest(split_dir)["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    pattern = rf"{shard.name}.*sha256 [0-9a-f]{{64}}, manifest expects [0-9a-f]{{64}}"
    with pytest.raises(ShardIntegrityError, match=pattern):
        verify_shards(split_dir)
    for read in (lambda: load_split_tensor(split_dir), lambda: ray_image_dataset(split_dir),
                 lambda: WebDatasetBatches(shard_urls(split_dir), 4, seed=0)):
        with pytest.raises(ShardIntegrityError, match=pattern):
            read()
    shard.unlink()
    with pytest.raises(ShardIntegrityError, match=rf"{shard.name}.*missing"):
        verify_shards(split_dir)


def _worker_loop(config: dict) -> None:
    """Ray Train worker: record the image ids this rank sees through both loaders."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    via_ray = [i for b in ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=4, drop_last=True, local_shuffle_buffer_size=8, local_shuffle_seed=0) for i in ids(b["image"])]
    via_wds = [i for images, _ in WebDatasetBatches(shard_urls(config["split_dir"]), 4, seed=0, rank=rank,
                                                    world_size=world) for i in ids(images)]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"ray": via_ray, "wds": via_wds}))
    ray.train.report({"done": 1})


def test_ray_train_workers_read_disjoint_subsets(splits, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_worker_loop, train_loop_config={"split_dir": str(splits["many"]), "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="ingest-readers", storage_path=str(tmp_path / "ray")),
                           datasets={"train": ray_image_dataset(splits["many"])})
    trainer.fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for path in ("ray", "wds"):
        a, b = seen[0][path], seen[1][path]
        assert len(a) == len(b) == N // 2, path
        assert not set(a) & set(b) and sorted(a + b) == list(range(N)), path
