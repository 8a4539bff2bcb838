"""Stage 1, ingest: a source of images → per-split webdataset tar shards + manifest.json, with Ray Data.

`KIND` runs `run_ingest` in the pipeline and publishes the split directories as URIs; its content hash covers the
manifests, which hold every shard's sha256.

    plan (driver: list inputs, fingerprint)  ──Ray Data map_batches (read, decode, validate, convert, encode PNG,
    assign split)──▶ driver (ordered stream: tar shards per split, sha256, manifests)  ──rename──▶ ingest-<fp>/

The output directory is named by a fingerprint of the source content and the config, written under a temporary
name and renamed when complete: a rerun with the same inputs reuses it and writes nothing, a changed input gets a
new directory, and an interrupted run leaves no half-written version behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.hashing import hash_files
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.images import RejectedImage, image_bytes_to_png, pixels_to_png
from pipelines.ingest.manifest import FORMAT, load_manifest, write_manifest
from pipelines.ingest.shards import SPLITS, ShardWriter, assign_split, sample_tar_bytes
from pipelines.ingest.sources import SourcePlan, expand_unit, plan_source
from pipelines.stage import StageContext, StageKind, StageResult

CODE_VERSION = "2"  # bump when the bytes written for the same inputs change
SUMMARY = "ingest.json"


class IngestError(RuntimeError):
    """The source yielded nothing usable, or too much of it was rejected."""


@dataclass(frozen=True)
class IngestResult:
    output_dir: Path                 # the versioned directory ingest-<fingerprint[:16]>
    splits: dict[str, Path]          # "train"/"val"/"test" → directory with shards and manifest.json
    num_samples: dict[str, int]
    fingerprint: str                 # sha256 of (code version, source content, config): a cache key
    reused: bool                     # True when an identical earlier output was found and nothing was written
    num_rejected: int = 0
    seconds: float = 0.0
    rejects: list[dict] = field(default_factory=list)


def process_units(batch: dict, size: int, channels: int, resize: str, val: float, test: float, seed: int) -> dict:
    """Ray Data map_batches function: pickled work units → per unit, one row per split plus one for rejects.

    Output columns: split ("train"/"val"/"test", or "" for the rejects row), tar (that split's samples as
    concatenated tar members, in input order), sizes (int64 byte length of each sample's members, as bytes),
    rejects (JSON list of {key, origin, split, reason}, on the rejects row). Every failure of a single input
    becomes a reject with a reason, never an exception.
    """
    rows = {name: [] for name in ("split", "tar", "sizes", "rejects")}
    for blob in batch["unit"]:
        parts: dict[str, list[bytes]] = {name: [] for name in SPLITS}
        rejects = []
        unit = pickle.loads(blob)
        for key, label, origin, data in expand_unit(unit):
            split = assign_split(key, val, test, seed, unit.get("official_split"))
            try:
                if isinstance(data, RejectedImage):
                    raise data
                png = (pixels_to_png(data, size, channels, resize) if isinstance(data, np.ndarray)
                       else image_bytes_to_png(data, size, channels, resize))
                parts[split].append(sample_tar_bytes(key, png, label))
            except RejectedImage as exc:
                rejects.append({"key": key, "origin": origin, "split": split, "reason": str(exc)})
            except Exception as exc:  # noqa: BLE001 — one odd file must not stop the run
                rejects.append({"key": key, "origin": origin, "split": split,
                                "reason": f"cannot convert: {exc.__class__.__name__}: {exc}"})
        for split, blobs in parts.items():
            sizes = np.array([len(b) for b in blobs], np.int64).tobytes()
            for name, value in zip(rows, (split, b"".join(blobs), sizes, "")):
                rows[name].append(value)
        for name, value in zip(rows, ("", b"", b"", json.dumps(rejects))):
            rows[name].append(value)
    return {name: np.array(values, dtype=object) for name, values in rows.items()}


def fingerprint_of(config: IngestConfig, source_fingerprint: str) -> str:
    """Content hash of everything that decides the output bytes (not `parallelism`)."""
    payload = {"format": FORMAT, "code": CODE_VERSION, "source": source_fingerprint,
               "config": config.model_dump(mode="json", exclude={"parallelism"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _parallelism(config: IngestConfig) -> int:
    import ray

    if config.parallelism:
        return config.parallelism
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if len(ray.nodes()) <= 1:  # a local cluster may advertise more logical CPUs than the machine has cores
        cpus = min(cpus, os.cpu_count() or 1)
    return max(1, min(cpus, 32))


def _existing(output_dir: Path, fingerprint: str, seconds: float) -> IngestResult:
    summary = json.loads((output_dir / SUMMARY).read_text())
    splits = {name: output_dir / name for name in summary["splits"]}
    return IngestResult(output_dir, splits, {n: load_manifest(d)["num_samples"] for n, d in splits.items()},
                        fingerprint, True, summary["num_rejected"], seconds, summary["rejects"])


def _convert(config: IngestConfig, plan: SourcePlan, parallelism: int, work: Path, progress: bool):
    """Run the Ray Data job and stream its rows into shard writers; returns (shards per split, rejects)."""
    import ray
    from tqdm import tqdm

    official_test = any(unit.get("official_split") == "test" for unit in plan.units)
    splits = [s for s in SPLITS if s == "train" or getattr(config.split, s) > 0 or (s == "test" and official_test)]
    writers = {s: ShardWriter(work / s, s, config.shard.sample_limit, config.shard.bytes_per_shard) for s in splits}
    for s in splits:
        (work / s).mkdir(parents=True)
    rejects: list[dict] = []
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in plan.units], override_num_blocks=len(plan.units))
        ds = ds.map_batches(process_units, batch_size=1, num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=min(parallelism, len(plan.units))),
                            fn_kwargs={"size": config.image.size, "channels": config.image.channels,
                                       "resize": config.image.resize, "val": config.split.val,
                                       "test": config.split.test, "seed": config.split.seed})
        with tqdm(total=plan.num_inputs, unit="img", desc="ingest", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                done = 0
                columns = (batch["split"], batch["tar"], batch["sizes"], batch["rejects"])
                for split, tar, sizes, unit_rejects in zip(*columns):
                    if split:
                        sizes = np.frombuffer(sizes, dtype=np.int64).tolist()
                        if split in writers and sizes:
                            writers[split].write_many(tar, sizes)
                        done += len(sizes)
                    else:
                        unit_rejects = json.loads(unit_rejects)
                        rejects += unit_rejects
                        done += len(unit_rejects)
                bar.update(done)
                bar.set_postfix(rejected=len(rejects), refresh=False)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    return {s: w.close() for s, w in writers.items()}, rejects


def _check_rejects(config: IngestConfig, plan: SourcePlan, accepted: int, rejects: list[dict]) -> None:
    examples = "; ".join(f"{r['origin']}: {r['reason']}" for r in rejects[:5])
    where = config.source.path or config.source.kind
    if accepted == 0:
        raise IngestError(f"ingest of {where}: no valid images among {plan.num_inputs} inputs "
                          f"({len(rejects)} rejected; e.g. {examples})")
    fraction = len(rejects) / max(plan.num_inputs, 1)
    if fraction > config.max_reject_fraction:
        raise IngestError(f"ingest of {where}: {len(rejects)} of {plan.num_inputs} inputs rejected "
                          f"({fraction:.1%} > max_reject_fraction {config.max_reject_fraction:.1%}); e.g. {examples}")


def run_ingest(config: IngestConfig, output_root: str | Path, progress: bool = True) -> IngestResult:
    """Ingest `config.source` into `output_root/ingest-<fingerprint[:16]>/{train,val,test}/` (Ray Data; initialises
    a local Ray when none is running). Splits with fraction 0 are left out."""
    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    output_root = Path(output_root).resolve()
    output_root.mkdir(parents=True, exist_ok=True)
    work = output_root / f".tmp-ingest-{uuid.uuid4().hex[:12]}"
    try:
        parallelism = _parallelism(config)
        plan = plan_source(config.source, parallelism, work / ".source")
        fingerprint = fingerprint_of(config, plan.fingerprint)
        final = output_root / f"ingest-{fingerprint[:16]}"
        if (final / SUMMARY).is_file():
            print(f"[raydiff ingest] unchanged source and config: reusing {final}", flush=True)
            return _existing(final, fingerprint, time.perf_counter() - start)
        shards, rejects = _convert(config, plan, parallelism, work, progress)
        num_samples = {s: sum(info.samples for info in infos) for s, infos in shards.items()}
        _check_rejects(config, plan, sum(num_samples.values()), rejects)
        image = {"size": config.image.size, "channels": config.image.channels, "mode": "L" if config.image.channels == 1
                 else "RGB", "dtype": "uint8", "layout": "HWC", "encoding": "png", "resize": config.image.resize}
        source = {"kind": config.source.kind, "path": config.source.path, "fingerprint": plan.fingerprint,
                  "num_inputs": plan.num_inputs}
        for split, infos in shards.items():
            split_rejects = [r for r in rejects if r["split"] == split]
            write_manifest(work / split, {
                "format": FORMAT, "split": split, "fingerprint": fingerprint, "source": source, "image": image,
                "config": config.model_dump(mode="json", exclude={"parallelism"}), "classes": plan.classes,
                "num_samples": num_samples[split], "num_shards": len(infos),
                "shards": [vars(info) for info in infos], "num_rejected": len(split_rejects), "rejects": split_rejects,
            })
        seconds = time.perf_counter() - start
        total_bytes = sum(info.bytes for infos in shards.values() for info in infos)
        (work / SUMMARY).write_text(json.dumps({
            "format": FORMAT, "fingerprint": fingerprint, "source": source, "splits": list(shards),
            "num_samples": num_samples, "num_rejected": len(rejects), "rejects": rejects, "bytes": total_bytes,
            "seconds": seconds}, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(work / ".source", ignore_errors=True)
        try:
            os.rename(work, final)
        except OSError:  # an identical run finished first: keep its output
            if not (final / SUMMARY).is_file():
                raise
            return _existing(final, fingerprint, time.perf_counter() - start)
        n_shards = sum(len(infos) for infos in shards.values())
        per_split = ", ".join(f"{s} {n}" for s, n in num_samples.items())
        print(f"[raydiff ingest] {sum(num_samples.values())} samples ({per_split}) in {n_shards} shards, "
              f"{len(rejects)} rejected, "
              f"{total_bytes / 1e6:.1f} MB, {seconds:.1f} s -> {final}", flush=True)
        return IngestResult(final, {s: final / s for s in shards}, num_samples, fingerprint, False, len(rejects),
                            seconds, rejects)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(ctx: StageContext) -> StageResult:
    result = run_ingest(ctx.params, ctx.output_dir, progress=False)
    splits = dict(sorted(result.splits.items()))
    manifests = [splits[name] / "manifest.json" for name in splits]
    for name, manifest in zip(splits, manifests):
        ctx.log_artifacts([manifest], f"manifests/{name}")
    return StageResult(
        values={"splits": {name: ctx.uri_of(path) for name, path in splits.items()},
                "num_samples": dict(result.num_samples), "fingerprint": result.fingerprint},
        metrics={f"num_samples_{name}": float(n) for name, n in result.num_samples.items()},
        content_hash=hash_files(manifests),
    )


KIND = StageKind(name="ingest", params="pipelines.ingest.config:IngestConfig", run=run, version=CODE_VERSION,
                 resources={"num_cpus": 0})
