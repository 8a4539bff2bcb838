"""HTTP request and response bodies (pydantic; FastAPI turns them into the OpenAPI schema at /docs).

Static bounds live here; bounds that depend on the served model or the app's arguments (steps ≤ T,
num_images ≤ max_num_images) are checked by the ingress and reported in the same 422 shape.
Unknown fields are errors, so a typo (`step` for `steps`) is not silently ignored; types are strict ("5" is not 5).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Format = Literal["png", "npy", "grid"]
MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SampleRequest(_Strict):
    sampler: Literal["ddpm", "ddim"] = Field("ddim", description="ancestral DDPM (Ho et al.) or DDIM (Song et al.)")
    steps: int | None = Field(None, ge=1, description="reverse steps, 1…T (default: T for ddpm, min(50, T) for "
                                                      "ddim); fewer than T respaces the schedule")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity η (ddim only; 0 = deterministic)")
    num_images: int = Field(1, ge=1, description="images to generate, 1…max_num_images")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed ⇒ same images; omitted: a random "
                                                                  "seed, returned in the response")
    format: Format = Field("png", description="png: one base64 PNG per image; npy: one base64 .npy of float32 "
                                              "[N, C, H, W] in [-1, 1]; grid: one base64 PNG grid")
    nrow: int | None = Field(None, ge=1, le=1024, description="grid: images per row (default ⌈√N⌉)")
    clip_denoised: bool = Field(True, description="clip the predicted x_0 to [-1, 1] at every step")


class ModelInfo(BaseModel):
    name: str
    version: str | None
    alias: str | None
    uri: str = Field(description="the model URI the deployment was given")
    loaded_uri: str = Field(description="the pinned URI actually loaded (an alias resolved to its version)")
    training_run_id: str | None
    image_size: int
    channels: int
    num_timesteps: int
    schedule: str
    device: str
    replica: str | None = None


class Timing(BaseModel):
    total_s: float = Field(description="ingress receipt → response")
    queue_s: float = Field(description="waiting to be admitted on the model replica (and transport)")
    sample_s: float = Field(description="this request's reverse process, from its first to its last step")
    encode_s: float
    batch_requests: int = Field(description="requests admitted into the model replica together with this one "
                                            "(@serve.batch)")
    batch_images: int = Field(description="the largest model call, in images, this request took part in "
                                          "(continuous batching: every request in flight shares each step's call)")


class SampleResponse(BaseModel):
    format: Format
    images: list[str] = Field(description="base64: N PNGs (png), one .npy (npy) or one PNG (grid)")
    shape: list[int] = Field(description="[N, C, H, W] of the samples")
    sampler: str
    steps: int
    eta: float
    seed: int
    model: ModelInfo
    timing: Timing


class ImagesRequest(_Strict):
    images: list[str] = Field(min_length=1, description="base64-encoded image files (PNG, JPEG, …) of the "
                                                        "model's size; a data: URL prefix is accepted")


class LikelihoodRequest(ImagesRequest):
    seed: int = Field(0, ge=0, le=MAX_SEED, description="noise for the Monte-Carlo ELBO terms")


class LikelihoodResponse(BaseModel):
    bits_per_dim: list[float] = Field(description="ELBO bound on −log p(x) per image, in bits/dim")
    prior_bpd: list[float]
    vb_bpd: list[float]
    decoder_bpd: list[float]
    mean_bits_per_dim: float
    model: ModelInfo
    seconds: float


class InterpolateRequest(ImagesRequest):
    images: list[str] = Field(min_length=2, max_length=2, description="exactly two base64 images: the path's ends")
    num_points: int = Field(8, ge=2, le=64, description="images along the path, both ends included")
    steps: int = Field(50, ge=1, description="DDIM steps for encoding and decoding, 1…T")
    clip_denoised: bool = False
    format: Format = "grid"
    nrow: int | None = Field(None, ge=1, le=1024)


class InterpolateResponse(BaseModel):
    format: Format
    images: list[str]
    shape: list[int]
    model: ModelInfo
    seconds: float


class ErrorBody(BaseModel):
    message: str = Field(description="human-readable; names the offending field")
    detail: list[dict] | str | None = None
