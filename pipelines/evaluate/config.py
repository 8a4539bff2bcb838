"""Parameters of the evaluate stage (validated at the edge; unknown keys are errors)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.evaluate.sampling import parse_sampler
from pipelines.strict import StrictConfig


DEFAULT_GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0)
DEFAULT_GUIDANCE_SAMPLER = "ddim-50"


class EvaluateConfig(StrictConfig):
    """bits/dim on bpd_batches × bpd_batch_size test images; FID of num_fid_samples per sampler against test images.

    samplers             "<sampler>-<steps>" strings, one table row each; a sampler is a name in
                         diffusion.sampler_specs.SAMPLER_NAMES at its default options (DDIM with η = 0)
    fid_feature_net      "digits": a small CNN trained on the TRAIN split (cached under feature_cache_dir);
                         "inception": pytorch-fid's Inception-v3 from the local state-dict file inception_weights
    feature_cache_dir    where the digits feature net is cached; None means ~/.cache/raydiff
    sample_batch_size    images per sampler call and per feature-network call
    guidance_scales      class-conditional models: classifier-free guidance scales s to sweep (ε̂ = ε_∅ + s·(ε_y − ε_∅),
                         s = 1 plain conditional, s = 0 the model's unconditional branch), num_fid_samples balanced
                         over the classes at each, scored by FID, KID and the class accuracy of the digits classifier;
                         [] turns the sweep off
    guidance_sampler     the "<sampler>-<steps>" the sweep samples with

    Every FID/KID is against the test images; the floor is real TRAIN images the feature net never saw (the digits
    net's hold-out) against the same test images. On an unconditional model the sweep is skipped at the defaults;
    guidance settings other than the defaults there are an error (they cannot be honoured), unless guidance_scales
    is [].
    """

    bpd_batches: int = Field(4, ge=1)
    bpd_batch_size: int = Field(64, ge=1)
    samplers: list[str] = Field(default_factory=lambda: ["ddpm-1000", "ddim-10", "ddim-20", "ddim-50", "ddim-100"],
                                min_length=1)
    num_fid_samples: int = Field(500, ge=2)
    fid_feature_net: Literal["digits", "inception"] = "digits"
    inception_weights: str | None = None
    feature_cache_dir: str | None = None
    seed: int = 0
    sample_batch_size: int = Field(250, ge=1)
    guidance_scales: list[float] = Field(default_factory=lambda: list(DEFAULT_GUIDANCE_SCALES))
    guidance_sampler: str = DEFAULT_GUIDANCE_SAMPLER

    @field_validator("samplers")
    @classmethod
    def _samplers_parse(cls, samplers: list[str]) -> list[str]:
        for text in samplers:
            parse_sampler(text)
        duplicates = sorted({s for s in samplers if samplers.count(s) > 1})
        if duplicates:
            raise ValueError(f"samplers lists {duplicates} more than once")
        return samplers

    @field_validator("guidance_sampler")
    @classmethod
    def _guidance_sampler_parses(cls, text: str) -> str:
        parse_sampler(text)
        return text

    @field_validator("guidance_scales")
    @classmethod
    def _guidance_scales_valid(cls, scales: list[float]) -> list[float]:
        bad = [s for s in scales if not math.isfinite(s) or s < 0]
        if bad:
            raise ValueError(f"guidance_scales must be finite and >= 0, got {bad}")
        duplicates = sorted({s for s in scales if scales.count(s) > 1})
        if duplicates:
            raise ValueError(f"guidance_scales lists {duplicates} more than once")
        return scales

    @property
    def guidance_is_default(self) -> bool:
        """True when neither guidance setting differs from its default."""
        return (tuple(self.guidance_scales) == DEFAULT_GUIDANCE_SCALES
                and self.guidance_sampler == DEFAULT_GUIDANCE_SAMPLER)

    @model_validator(mode="after")
    def _inception_needs_weights(self) -> "EvaluateConfig":
        if self.fid_feature_net == "inception" and self.inception_weights is None:
            raise ValueError("fid_feature_net='inception' needs inception_weights: a local path to pytorch-fid's "
                             "pt_inception-2015-12-05 state dict (nothing is downloaded)")
        if self.fid_feature_net == "digits" and self.inception_weights is not None:
            raise ValueError("inception_weights is set but fid_feature_net='digits'; set fid_feature_net='inception' "
                             "to use it, or remove inception_weights")
        return self
