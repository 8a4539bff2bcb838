"""HTTP request and response bodies (pydantic; FastAPI turns them into the OpenAPI schema at /docs).

Static bounds live here; bounds that depend on the served model or the app's arguments (steps ≤ T,
num_images ≤ max_num_images) are checked by the ingress and reported in the same 422 shape.
Unknown fields are errors, so a typo (`step` for `steps`) is not silently ignored; types are strict ("5" is not 5).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, WithJsonSchema,
                      create_model)

from diffusion.sampler_specs import SAMPLER_NAMES, SAMPLER_SPECS, OptionSpec

Format = Literal["png", "npy", "grid"]
MAX_SEED = 2**63 - 1
# Sampler options under another name in the HTTP API (kept for existing clients).
REQUEST_FIELD = {"clip_x0": "clip_denoised"}


class Strict(BaseModel):
    """The base of every request body and of the app's arguments: unknown fields are errors, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


def _sampler_lines() -> str:
    return "; ".join(f"{s.name}: {s.description} ({s.paper}), default steps "
                     f"{'T' if s.default_steps is None else f'min({s.default_steps}, T)'}" for s in SAMPLER_SPECS.values())


MAX_GUIDANCE_SCALE = 20.0


def _label(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("a class label is a class index (integer) or a class name (string)")
    return value


def _one_label_for_all(value: Any) -> Any:
    """A bare label means that label for every image."""
    return [value] if isinstance(value, (int, str)) and not isinstance(value, bool) else value


# A class label: an index (0…K−1, or the index as a string) or one of the model's class names (see GET /v1/models);
# checked against the served model by the ingress.
Label = Annotated[Any, PlainValidator(_label),
                  WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]})]
ClassLabels = Annotated[Annotated[list[Label], Field(min_length=1)] | None, BeforeValidator(_one_label_for_all)]


class _SampleFields(Strict):
    sampler: Literal[SAMPLER_NAMES] = Field("ddim", description=_sampler_lines())  # type: ignore[valid-type]
    steps: int | None = Field(None, ge=1, description="reverse steps, 1…T (default: the sampler's, see `sampler`); "
                                                      "fewer than T respaces the schedule")
    num_images: int = Field(1, ge=1, description="images to generate, 1…max_num_images")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed ⇒ same images; omitted: a random "
                                                                  "seed, returned in the response")
    format: Format = Field("png", description="png: one base64 PNG per image; npy: one base64 .npy of float32 "
                                              "[N, C, H, W] in [-1, 1]; grid: one base64 PNG grid")
    nrow: int | None = Field(None, ge=1, le=1024, description="grid: images per row (default ⌈√N⌉)")
    class_labels: ClassLabels = Field(None, description="class-conditional models: the class of each image — one "
                                                        "label for all images or one per image; a label is a class "
                                                        "index or a class name (GET /v1/models lists them). Omitted: "
                                                        "unconditional (the null class)")
    guidance_scale: float = Field(1.0, ge=0.0, le=MAX_GUIDANCE_SCALE,
                                  description="classifier-free guidance s with class_labels: ε̂ = ε(∅) + s·(ε(y) − "
                                              "ε(∅)); 1 = plain conditional sampling, 0 = unconditional, > 1 = "
                                              "stronger class fidelity, less diversity")


def _option_default(name: str) -> Any:
    """An option's default when every sampler that takes it agrees on one, else None ("the sampler's default")."""
    defaults = {s.options[name].default for s in SAMPLER_SPECS.values() if name in s.options}
    return defaults.pop() if len(defaults) == 1 else None


def _option_field(name: str, option: OptionSpec) -> tuple[Any, Any]:
    """A request field for a sampler option: its type and bounds from the catalog; unset means the sampler's
    default."""
    takers = [s.name for s in SAMPLER_SPECS.values() if name in s.options]
    default = _option_default(name)
    kind = Literal[option.choices] if option.choices else type(option.default)  # type: ignore[valid-type]
    description = f"{option.description} (option of {', '.join(takers)}" + \
        (")" if default is not None else "; default: the sampler's)")
    return (kind if default is not None else kind | None,
            Field(default, ge=option.ge, le=option.le, description=description))


def _merged_options() -> dict[str, OptionSpec]:
    """Every option any sampler takes, by name (the first sampler's spec of it)."""
    merged: dict[str, OptionSpec] = {}
    for spec in SAMPLER_SPECS.values():
        for name, option in spec.options.items():
            merged.setdefault(name, option)
    return merged


OPTIONS = _merged_options()
OPTION_DEFAULTS = {name: _option_default(name) for name in OPTIONS}

# POST /v1/samples: the fields above plus one per sampler option in the catalog (eta, variance, clip_denoised,
# spacing, ...), so a sampler added to diffusion/ is served with its options and nothing here changes.
SampleRequest = create_model("SampleRequest", __base__=_SampleFields,
                             **{REQUEST_FIELD.get(n, n): _option_field(n, o) for n, o in OPTIONS.items()})


def sampler_options(body: BaseModel) -> dict[str, Any]:
    """The sampler options a request sets: {option name: value} for the fields given in the body."""
    return {name: getattr(body, REQUEST_FIELD.get(name, name)) for name in OPTIONS
            if REQUEST_FIELD.get(name, name) in body.model_fields_set}


class SamplerInfo(BaseModel):
    name: str
    description: str
    default_steps: int | None = Field(description="None: all T steps")
    options: dict[str, Any] = Field(description="request field → the sampler's default")


def sampler_infos() -> list[SamplerInfo]:
    return [SamplerInfo(name=s.name, description=f"{s.description} ({s.paper})", default_steps=s.default_steps,
                        options={REQUEST_FIELD.get(n, n): o.default for n, o in s.options.items()})
            for s in SAMPLER_SPECS.values()]


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
    num_classes: int | None = Field(None, description="classes of a class-conditional model; None: unconditional")
    class_names: list[str] | None = Field(None, description="class names by index (the indices \"0\"…\"K−1\" "
                                                            "when the model has none): what class_labels accepts")
    samplers: list[SamplerInfo] = Field(default_factory=sampler_infos, description="the samplers this endpoint runs")


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
    eta: float = Field(description="DDIM's η (0 for samplers without it)")
    options: dict[str, Any] = Field(description="the sampler options this request set (request field names)")
    seed: int
    class_labels: list[int] | None = Field(None, description="the class index of each image (None: unconditional)")
    guidance_scale: float = Field(1.0, description="classifier-free guidance scale (1: none)")
    model: ModelInfo
    timing: Timing


class ImagesRequest(Strict):
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
