"""The ingest stage end to end with real Ray Data and real tar files: every source kind, bad inputs,
idempotence and versioning, and that both `webdataset` and `ray.data.read_webdataset` read what we wrote."""

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.manifest import load_manifest, verify_shards
from pipelines.ingest.reader import load_split_tensor, shard_urls
from pipelines.ingest.stage import IngestError, run_ingest


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path, n: int, size: int = 6, classes=("cat", "dog"), seed: int = 0) -> dict[str, np.ndarray]:
    """n random RGB PNGs split over class subfolders; returns {relative path: pixels}."""
    rng, images = np.random.default_rng(seed), {}
    for i in range(n):
        rel = f"{classes[i % len(classes)]}/img.{i:03d}.png"
        images[rel] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(images[rel]))
    return images


def read_all(split_dirs) -> dict[str, tuple[np.ndarray, int]]:
    """{key: (uint8 HWC pixels, label)} over the splits, read with the webdataset package's own decoder."""
    out = {}
    for split_dir in split_dirs:
        for sample in wds.WebDataset(shard_urls(split_dir), shardshuffle=False).decode("rgb8"):
            out[sample["__key__"]] = (sample["png"], sample.get("cls", -1))
    return out


@pytest.fixture(scope="module")
def folder_run(ray_session, tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out")
    images = write_folder(src, 40)
    config = IngestConfig.model_validate({"source": {"kind": "folder", "path": str(src)},
                                          "image": {"size": 6, "channels": 3}, "split": {"val": 0.2, "test": 0.2},
                                          "shard": {"samples_per_shard": 5}})
    return src, out, images, config, run_ingest(config, out, progress=False)


def test_folder_round_trip_is_pixel_exact_through_webdataset_and_ray(folder_run, ray_session):
    import ray

    src, _, images, _, result = folder_run
    assert set(result.splits) == {"train", "val", "test"} and sum(result.num_samples.values()) == 40
    by_key = read_all(result.splits.values())
    assert len(by_key) == 40
    classes = load_manifest(result.splits["train"])["classes"]
    assert classes == ["cat", "dog"]
    for rel, pixels in images.items():
        got, label = by_key[rel.replace("/", "_").replace(".", "_")]
        assert np.array_equal(got, pixels) and label == classes.index(rel.split("/")[0])
    rows = ray.data.read_webdataset(shard_urls(result.splits["train"])).take_all()
    assert len(rows) == result.num_samples["train"]
    for row in rows:
        assert np.array_equal(row["png"], by_key[row["__key__"]][0]) and row["cls"] == by_key[row["__key__"]][1]
    x, _ = load_split_tensor(result.splits["train"])
    first = rows[0]["png"]
    assert np.array_equal(np.rint((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8), first)


def test_manifest_records_shards_counts_spec_and_checksums(folder_run):
    _, _, _, _, result = folder_run
    for split, split_dir in result.splits.items():
        manifest = verify_shards(split_dir)
        assert manifest["split"] == split and manifest["num_samples"] == result.num_samples[split]
        assert manifest["image"] == {"size": 6, "channels": 3, "mode": "RGB", "dtype": "uint8", "layout": "HWC",
                                     "encoding": "png", "resize": "resize"}
        assert manifest["fingerprint"] == result.fingerprint and len(manifest["source"]["fingerprint"]) == 64
        assert all(s["samples"] <= 5 for s in manifest["shards"])
        assert sum(s["samples"] for s in manifest["shards"]) == manifest["num_samples"]
        for shard in manifest["shards"]:
            with tarfile.open(split_dir / shard["file"]) as tar:
                names = tar.getnames()
            assert len(names) == 2 * shard["samples"]  # png + cls per sample
            assert all(a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0] for a, b in zip(names[::2], names[1::2]))


def test_same_inputs_give_identical_shards_anywhere(folder_run, tmp_path):
    _, _, _, config, first = folder_run
    elsewhere = run_ingest(config, tmp_path, progress=False)
    assert not elsewhere.reused and elsewhere.fingerprint == first.fingerprint
    for split in first.splits:
        assert load_manifest(elsewhere.splits[split])["shards"] == load_manifest(first.splits[split])["shards"]


def test_rerun_reuses_and_changes_make_a_new_version(folder_run, ray_session):
    src, out, _, config, first = folder_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_ingest(config, out, progress=False)
    assert again.reused and again.output_dir == first.output_dir and again.fingerprint == first.fingerprint
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    bigger = run_ingest(config.model_copy(update={"image": config.image.model_copy(update={"size": 4})}), out,
                        progress=False)
    assert not bigger.reused and bigger.output_dir != first.output_dir
    (src / "cat" / "img.000.png").write_bytes(png_bytes(np.zeros((6, 6, 3), dtype=np.uint8)))
    changed = run_ingest(config, out, progress=False)
    assert not changed.reused and changed.fingerprint not in (first.fingerprint, bigger.fingerprint)
    for result in (first, bigger, changed):  # older versions intact
        for split_dir in result.splits.values():
            verify_shards(split_dir)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_bad_and_odd_inputs_are_rejected_or_converted_never_crash(ray_session, tmp_path):
    src = tmp_path / "src"
    write_folder(src, 12, size=8, classes=("a",))
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (src / "b").mkdir()
    (src / "b" / "truncated.png").write_bytes(png_bytes(noise)[:-400])
    (src / "b" / "notes.txt").write_text("not an image")
    (src / "b" / "empty.png").write_bytes(b"")
    os.symlink(src / "b" / "gone.png", src / "b" / "dangling.png")  # unreadable path
    odd = {"cmyk.jpg": (Image.new("CMYK", (20, 10), (0, 0, 0, 0)), "JPEG"),
           "sixteen.png": (Image.fromarray(np.full((9, 9), 40000, dtype=np.uint16)), "PNG"),
           "palette.png": (Image.fromarray(noise).convert("P"), "PNG"),
           "gray.webp": (Image.fromarray(np.full((5, 7), 90, dtype=np.uint8)), "WEBP"),
           "huge.png": (Image.new("RGB", (3000, 2500), (10, 200, 30)), "PNG"),
           "tiny.png": (Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")}
    (src / "c").mkdir()
    for name, (image, fmt) in odd.items():
        image.save(src / "c" / name, format=fmt)
    config = {"source": {"kind": "folder", "path": str(src)}, "image": {"size": 8, "channels": 3},
              "split": {"val": 0.0, "test": 0.0}, "max_reject_fraction": 0.3}
    result = run_ingest(IngestConfig.model_validate(config), tmp_path / "out", progress=False)
    reasons = {r["origin"]: r["reason"] for r in result.rejects}
    assert set(reasons) == {"b/truncated.png", "b/notes.txt", "b/empty.png", "b/dangling.png"}
    assert "truncated" in reasons["b/truncated.png"] and "not an image" in reasons["b/notes.txt"]
    assert "zero-byte" in reasons["b/empty.png"] and "unreadable" in reasons["b/dangling.png"]
    assert load_manifest(result.splits["train"])["rejects"] == result.rejects
    assert result.num_samples == {"train": 18}
    pixels = read_all([result.splits["train"]])
    assert (pixels["c_sixteen_png"][0] == round(40000 / 257)).all() and (pixels["c_gray_webp"][0] == 90).all()
    assert (pixels["c_huge_png"][0] == [10, 200, 30]).all() and (pixels["c_tiny_png"][0] == [1, 2, 3]).all()
    assert (pixels["c_cmyk_jpg"][0] > 245).all()

    with pytest.raises(IngestError, match=r"4 of 22 inputs rejected .* max_reject_fraction 10\.0%.*b/"):
        run_ingest(IngestConfig.model_validate({**config, "max_reject_fraction": 0.1}), tmp_path / "out2",
                   progress=False)
    assert not list((tmp_path / "out2").iterdir())  # nothing half-written


def test_nothing_valid_fails_clearly(ray_session, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(b"garbage")
    config = IngestConfig.model_validate({"source": {"kind": "folder", "path": str(tmp_path / "src")},
                                          "max_reject_fraction": 1.0})
    with pytest.raises(IngestError, match=r"no valid images among 1 inputs.*a\.png: not an image"):
        run_ingest(config, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        run_ingest(IngestConfig.model_validate({"source": {"kind": "folder", "path": str(tmp_path / "nope")}}),
                   tmp_path / "out", progress=False)


def test_parquet_and_arrow_tables_with_labels(ray_session, tmp_path):
    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(30)]
    cells = [png_bytes(p) for p in pixels]
    cells[7] = b"broken"
    table = pa.table({"img": cells, "y": list(range(30))})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=8)
    base = {"image": {"size": 4, "channels": 1}, "split": {"val": 0.0, "test": 0.0}}
    result = run_ingest(IngestConfig.model_validate(
        {**base, "source": {"kind": "parquet", "path": str(tmp_path / "part.parquet"), "image_column": "img",
                            "label_column": "y"}}), tmp_path / "out", progress=False)
    assert result.num_samples == {"train": 29} and [r["key"] for r in result.rejects] == ["part-00000007"]
    got = read_all([result.splits["train"]])
    for i in (0, 8, 29):
        assert np.array_equal(got[f"part-{i:08d}"][0][:, :, 0], pixels[i]) and got[f"part-{i:08d}"][1] == i

    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=10)
    arrow = run_ingest(IngestConfig.model_validate(
        {**base, "source": {"kind": "parquet", "path": str(tmp_path / "t.arrow"), "image_column": "img",
                            "label_column": None}}), tmp_path / "out", progress=False)
    assert arrow.num_samples == {"train": 29}
    assert all(label == -1 for _, label in read_all([arrow.splits["train"]]).values())
    with pytest.raises(ValueError, match=r"no image column 'pixels'"):
        run_ingest(IngestConfig.model_validate({**base, "source": {"kind": "parquet", "path": str(tmp_path / "t.arrow"),
                                                                  "image_column": "pixels"}}), tmp_path, progress=False)


def test_cifar10_python_archive(ray_session, tmp_path):
    """A real-format CIFAR-10 python archive (pickled batches in a tar.gz), 10 images per batch."""
    rng, names = np.random.default_rng(9), [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    first = None
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
        for name in names:
            data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
            first = data[0] if first is None else first
            blob = pickle.dumps({b"data": data, b"labels": list(range(10)), b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    archive_path = str(tmp_path / "cifar-10-python.tar.gz")
    config = IngestConfig.model_validate({"source": {"kind": "cifar10", "path": archive_path},
                                          "image": {"size": 32, "channels": 3}, "split": {"val": 0.5, "test": 0.0}})
    result = run_ingest(config, tmp_path / "out", progress=False)
    assert sum(result.num_samples.values()) == 60 and set(result.splits) == {"train", "val", "test"}
    got = read_all(result.splits.values())
    # the official split: test_batch is the test split, whole; val is drawn from the data batches only
    assert result.num_samples["test"] == 10 and result.num_samples["train"] + result.num_samples["val"] == 50
    assert {key.split("-")[1] for key in read_all([result.splits["test"]])} == {"test_batch"}
    assert {key.split("-")[1] for key in read_all([result.splits["val"]])} <= {f"data_batch_{i}" for i in range(1, 6)}
    assert np.array_equal(got["cifar10-data_batch_1-00000"][0], first.reshape(3, 32, 32).transpose(1, 2, 0))
    assert load_manifest(result.splits["val"])["classes"][0] == "airplane"
    assert json.loads((result.output_dir / "ingest.json").read_text())["num_samples"] == result.num_samples


def test_bytes_per_shard_limit(ray_session, tmp_path):
    result = run_ingest(IngestConfig.model_validate({"shard": {"bytes_per_shard": 200_000}, "split": {"seed": 3}}),
                        tmp_path, progress=False)
    manifest = load_manifest(result.splits["train"])
    assert manifest["num_shards"] > 1 and all(s["bytes"] <= 200_000 for s in manifest["shards"])
    assert sum(result.num_samples.values()) == 1797
