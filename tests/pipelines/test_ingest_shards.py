"""Tar shards without Ray: headers identical to `tarfile`'s, long keys, shard limits, reproducible bytes, and
readability by tarfile, the webdataset package and our own fast member reader."""

import tarfile

import pytest
import webdataset as wds

from pipelines.ingest.reader import _tar_files
from pipelines.ingest.shards import ShardWriter, _header, _tarinfo_header, sample_tar_bytes


@pytest.mark.parametrize("name, size", [("a.png", 0), ("digits-00001.png", 123), ("x" * 99, 10**6),
                                        ("\u00e9t\u00e9.cls", 1), ("y" * 150 + ".png", 5)])
def test_fast_header_matches_tarfile(name, size):
    assert _header(name, size) == _tarinfo_header(name, size)


def write(tmp_path, samples, **limits):
    writer = ShardWriter(tmp_path, "train", limits.get("max_samples"), limits.get("max_bytes"))
    blobs = [sample_tar_bytes(key, data, label) for key, data, label in samples]
    writer.write_many(b"".join(blobs[:3]), [len(b) for b in blobs[:3]])
    for blob in blobs[3:]:
        writer.write(blob)
    return writer.close()


def test_shards_are_standard_tars_with_adjacent_members_and_limits(tmp_path):
    samples = [(f"k{i:03d}" + ("_" + "z" * 120 if i == 4 else ""), bytes([i]) * (100 + 300 * i), i - 1)
               for i in range(10)]
    shards = write(tmp_path, samples, max_samples=4)
    assert [s.samples for s in shards] == [4, 4, 2]
    names = []
    for shard in shards:
        with tarfile.open(tmp_path / shard.file) as tar:
            names += tar.getnames()
        assert (tmp_path / shard.file).stat().st_size == shard.bytes and shard.bytes % 10240 == 0
    assert names[:3] == ["k000.png", "k001.png", "k001.cls"]  # label −1: no .cls member
    urls = [str(tmp_path / s.file) for s in shards]
    via_wds = list(wds.WebDataset(urls, shardshuffle=False))
    via_ours = [f["fname"] for f in _tar_files({"url": u} for u in urls)]
    assert via_ours == names and [s["__key__"] for s in via_wds] == [k for k, _, _ in samples]
    assert via_wds[4]["png"] == samples[4][1] and via_wds[4]["cls"] == b"3"

    (tmp_path / "b").mkdir()
    by_bytes = write(tmp_path / "b", samples, max_bytes=12 * 1024)
    assert len(by_bytes) > 1 and all(s.bytes <= 12 * 1024 for s in by_bytes)
    assert sum(s.samples for s in by_bytes) == 10


def test_same_samples_give_identical_bytes(tmp_path):
    samples = [(f"s{i}", b"png-bytes-%d" % i, i) for i in range(7)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert [s.sha256 for s in write(tmp_path / "a", samples, max_samples=3)] == \
           [s.sha256 for s in write(tmp_path / "b", samples, max_samples=3)]
