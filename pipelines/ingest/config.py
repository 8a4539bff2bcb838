"""Ingest parameters: which source, what image spec, how to split and shard. Unknown keys are errors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.strict import StrictConfig


class SourceConfig(StrictConfig):
    """Where the images come from.

    kind: "sklearn_digits" (embedded 1797 8x8 images, offline), "folder" (image files, recursive; label = first
    subfolder name), "parquet" (Parquet or Arrow IPC file / folder of them with an image-bytes column),
    "cifar10" (the python-version archive cifar-10-python.tar.gz, or its extracted cifar-10-batches-py folder).
    """

    kind: Literal["sklearn_digits", "folder", "parquet", "cifar10"] = "sklearn_digits"
    path: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"

    @model_validator(mode="after")
    def _path_when_needed(self) -> "SourceConfig":
        if self.kind != "sklearn_digits" and not self.path:
            raise ValueError(f"source.path is required for source.kind={self.kind!r}")
        return self


class ImageConfig(StrictConfig):
    """Output image spec: `size` x `size` pixels, `channels` 1 (L) or 3 (RGB), stored as uint8 PNG (H, W, C)."""

    size: int = Field(8, ge=1, le=4096)
    channels: Literal[1, 3] = 1
    resize: Literal["resize", "center_crop"] = "resize"  # resize: whole image squashed; center_crop: central square


class SplitConfig(StrictConfig):
    """Fractions of val and test (train gets the rest), assigned by a stable hash of (seed, key).

    A source with an official test set keeps it (CIFAR-10: test_batch is the test split, its 10,000 images, so FID
    and bits/dim compare with the papers); `test` is not drawn from it, and `val` is drawn from its training images.
    """

    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _train_remains(self) -> "SplitConfig":
        if self.val + self.test >= 1.0:
            raise ValueError(f"split.val + split.test = {self.val + self.test} leaves nothing for train")
        return self


class ShardConfig(StrictConfig):
    """Close a shard when it holds `samples_per_shard` samples or would pass `bytes_per_shard` bytes.

    With neither set, shards hold 1000 samples.
    """

    samples_per_shard: int | None = Field(None, ge=1)
    bytes_per_shard: int | None = Field(None, ge=1024)

    @property
    def sample_limit(self) -> int | None:
        if self.samples_per_shard is None and self.bytes_per_shard is None:
            return 1000
        return self.samples_per_shard


class IngestConfig(StrictConfig):
    """Stage 1 parameters; `IngestConfig()` is the embedded digits dataset at 8x8x1."""

    source: SourceConfig = SourceConfig()
    image: ImageConfig = ImageConfig()
    split: SplitConfig = SplitConfig()
    shard: ShardConfig = ShardConfig()
    max_reject_fraction: float = Field(0.1, ge=0.0, le=1.0)
    parallelism: int | None = Field(None, ge=1)  # Ray Data tasks in flight; None: the cluster's CPUs, at most 8
