"""`Ingress`: the HTTP side of the serving app — FastAPI routes, request validation, image encoding, retries
towards the model deployment. It never imports torch: a request is validated against the sampler catalog
(`diffusion.sampler_specs`, plain data) and passed on as a plain dict.

    POST /v1/samples   samples from any registered sampler (png | npy | grid), batched across callers; a
                       class-conditional model takes class_labels and a classifier-free guidance_scale
    POST /v1/samples/stream   the same for one request, with per-step progress (NDJSON)
    POST /v1/likelihood   ELBO bits/dim of uploaded images
    POST /v1/interpolate  DDIM-encode two images, slerp the latents, decode
    GET  /v1/models, /healthz, /readyz, / (a small page to try the samplers), /docs (OpenAPI)
"""

# No `from __future__ import annotations` here: FastAPI must see the real request types when Serve rebuilds
# the ingress class in the replica.
import asyncio
import json
import logging
import random
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffusion.sampler_specs import SAMPLER_SPECS
from services import codec
from services.args import AppArgs
from services.page import INDEX_HTML
from services.schemas import (
    MAX_SEED,
    OPTION_DEFAULTS,
    REQUEST_FIELD,
    ErrorBody,
    InterpolateRequest,
    InterpolateResponse,
    LikelihoodRequest,
    LikelihoodResponse,
    ModelInfo,
    SampleRequest,
    SampleResponse,
    Timing,
    sampler_options,
)

log = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
INFO_TTL_S = 30.0

api = FastAPI(
    title="raydiff",
    version="1",
    description="DDPM/DDIM sampling, likelihood and interpolation for a diffusion model from the MLflow registry.",
)
ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    413: "request body larger than max_body_bytes", 422: "invalid field (the message names it)",
    503: "model replica unavailable", 504: "request_timeout_s exceeded"}.items()}


def _field_path(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def _message(errors: list[dict]) -> str:
    return "; ".join(f"{_field_path(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors)


def invalid(field: str, message: str, value: Any = None) -> HTTPException:
    """A 422 in the same shape FastAPI gives schema errors."""
    return HTTPException(422, [{"loc": ["body", *field.split(".")], "msg": message, "type": "value_error",
                                "input": value}])


@api.exception_handler(RequestValidationError)
async def _on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(error.errors(), custom_encoder={bytes: lambda b: f"<{len(b)} bytes>"})
    for e in errors:  # a whole uploaded body echoed back helps no one
        if isinstance(e.get("input"), (str, dict, list)) and len(json.dumps(e["input"])) > 200:
            e["input"] = "<omitted>"
    return JSONResponse({"message": _message(errors), "detail": errors}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
    detail = error.detail
    message = _message(detail) if isinstance(detail, list) else str(detail)
    return JSONResponse({"message": message, "detail": jsonable_encoder(detail)}, status_code=error.status_code,
                        headers=getattr(error, "headers", None))


# Set by Ingress.__init__ through the real module: Serve ships the ingress class (and its view of `api`) by value,
# while this module-level middleware is imported by reference in the replica.
BODY_LIMIT = {"bytes": 4 * 2**20}


class BodyLimit:
    """ASGI middleware: 413 once a request body exceeds max_body_bytes (by Content-Length, or counted as it
    streams in)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BODY_LIMIT["bytes"]
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(send, limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(send, limit)

    @staticmethod
    async def _reject(send, limit: int):
        body = json.dumps({"message": f"body: request body exceeds {limit} bytes (max_body_bytes)",
                           "detail": None}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


api.add_middleware(BodyLimit)


def encode(images: np.ndarray, fmt: str, nrow: int | None) -> list[str]:
    if fmt == "png":
        return codec.png_list(images)
    if fmt == "npy":
        return [codec.b64(codec.npy_bytes(images))]
    return [codec.b64(codec.grid_png(images, nrow))]


def _class_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", … ({len(names)} in all, GET /v1/models lists them)" if len(names) > limit else "")


def class_labels(body: BaseModel, info: dict) -> list[int] | None:
    """The request's class labels as class indices (one, or one per image), checked against the served model's
    classes: an index 0…K−1, a class name, or an index written as a string (names win where both match). Labels on
    an unconditional model, a guidance scale ≠ 1 without labels or on an unconditional model, a label count other
    than 1 or num_images, or an unknown label are a 422 naming the field."""
    num_classes, names = info.get("num_classes"), info.get("class_names")
    labels, scale = body.class_labels, body.guidance_scale
    if num_classes is None:
        if labels is not None:
            raise invalid("class_labels", "this model is unconditional (trained without classes): omit class_labels",
                          labels)
        if scale != 1.0:
            raise invalid("guidance_scale", f"must be 1 for this unconditional model (classifier-free guidance needs "
                                            f"a class-conditional one), got {scale:g}", scale)
        return None
    if labels is None:
        if scale != 1.0:
            raise invalid("guidance_scale", f"needs class_labels (guidance steers towards a class), got {scale:g} "
                                            "without any", scale)
        return None
    if len(labels) not in (1, body.num_images):
        raise invalid("class_labels", f"give 1 label (for all images) or num_images={body.num_images} labels, got "
                                      f"{len(labels)}", labels)
    names = list(names or (str(k) for k in range(num_classes)))
    indices = []
    for k, label in enumerate(labels):
        if isinstance(label, str) and label in names:
            indices.append(names.index(label))
        elif isinstance(label, str) and label.isdecimal() and int(label) < num_classes:
            indices.append(int(label))
        elif isinstance(label, int) and 0 <= label < num_classes:
            indices.append(label)
        else:
            raise invalid(f"class_labels.{k}", f"{label!r} is not a class of this model: give an index "
                                               f"0…{num_classes - 1} or a name ({_class_list(names)})", label)
    return indices


async def _awaited(response):
    return await response


async def _parse(request: Request, model: type[BaseModel], raw_field: str) -> BaseModel:
    """A JSON body validated as `model`, or a raw image/* body as `{raw_field: [base64(body)]}`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data = await request.body()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        payload: Any = {raw_field: [codec.b64(data)]}
    else:
        try:
            payload = json.loads(data or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestValidationError([{"loc": ("body",), "msg": f"JSON decode error: {error}",
                                           "type": "json_invalid"}]) from None
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


@serve.deployment(name="Ingress", max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    def __init__(self, sampler: DeploymentHandle, args: dict):
        self.sampler = sampler
        self.args = AppArgs.model_validate(args)
        import services.ingress

        services.ingress.BODY_LIMIT["bytes"] = self.args.max_body_bytes
        self._info: dict | None = None
        self._info_at = 0.0
        self._refresh: asyncio.Task | None = None

    # -- plumbing

    async def _call(self, method: str, *args) -> dict:
        """Call the model deployment; retry while its replica is dead/unavailable, within request_timeout_s."""
        timeout = self.args.request_timeout_s
        deadline = time.monotonic() + timeout
        delay, attempt = 0.2, 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HTTPException(504, f"request timed out after {timeout:g}s (request_timeout_s) while the "
                                         "model replica was unavailable")
            response = getattr(self.sampler, method).remote(*args)
            try:
                return await asyncio.wait_for(_awaited(response), remaining)
            except asyncio.TimeoutError:
                response.cancel()
                raise HTTPException(504, f"request timed out after {timeout:g}s (request_timeout_s)") from None
            except RETRYABLE as error:
                attempt += 1
                log.warning("raydiff: %s failed on an unavailable replica (attempt %d): %s", method, attempt,
                            type(error).__name__)
                if attempt >= 8 or deadline - time.monotonic() < delay:
                    raise HTTPException(503, f"model replica unavailable ({type(error).__name__}); "
                                             "retry later") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)

    async def model_info(self) -> dict:
        """The served model's info, cached; refreshed in the background after INFO_TTL_S."""
        if self._info is None:
            self._info = await self._call("info")
            self._info_at = time.monotonic()
        elif time.monotonic() - self._info_at > INFO_TTL_S and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._refresh_info())
        return self._info

    async def _refresh_info(self) -> None:
        try:
            self._info = await self._call("info")
            self._info_at = time.monotonic()
        except Exception:  # keep serving the cached info; /readyz reports the failure
            pass

    def _decode(self, images: list[str], info: dict) -> np.ndarray:
        shape = (info["channels"], info["image_size"], info["image_size"])
        out = []
        for k, text in enumerate(images):
            try:
                out.append(codec.decode_image(codec.decode_b64(text), shape))
            except codec.ImageDecodeError as error:
                raise invalid(f"images.{k}", str(error)) from None
        return np.stack(out).astype(np.float32)

    # -- routes

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(INDEX_HTML)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """The HTTP ingress is up (says nothing about the model)."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz(self) -> dict:
        """A model replica answers (or answered within the last INFO_TTL_S seconds)."""
        if self._info is not None and time.monotonic() - self._info_at < INFO_TTL_S:
            return {"status": "ready", "model": self._info["loaded_uri"]}
        try:
            self._info = await asyncio.wait_for(_awaited(self.sampler.info.remote()), 10.0)
            self._info_at = time.monotonic()
        except Exception as error:
            raise HTTPException(503, f"model not ready: {type(error).__name__}: {error}"[:500]) from None
        return {"status": "ready", "model": self._info["loaded_uri"]}

    @api.get("/v1/models", response_model=list[ModelInfo], responses=ERRORS)
    async def models(self) -> list[dict]:
        """The served model: registry name, version and alias, image size, T, the training run id and, for a
        class-conditional model, its classes (what `class_labels` accepts)."""
        self._info = await self._call("info")
        self._info_at = time.monotonic()
        return [self._info]

    async def _job(self, body: SampleRequest) -> dict:
        """The request as SampleJob fields, after the checks that need the model (T, its classes), the sampler
        catalog or the app's limits. An option set to its default for a sampler that does not take it is ignored;
        any other value for it is a 422 naming the field."""
        info = await self.model_info()
        T = info["num_timesteps"]
        spec = SAMPLER_SPECS[body.sampler]
        steps = spec.steps_for(T) if body.steps is None else body.steps
        if steps > T:
            raise invalid("steps", f"must be between 1 and T={T} for this model, got {steps}", steps)
        options = {}
        for name, value in sampler_options(body).items():
            if value is None or (name not in spec.options and value == OPTION_DEFAULTS[name]):
                continue  # the sampler's default, or another sampler's option left at its default
            field = REQUEST_FIELD.get(name, name)
            try:
                options[name] = spec.resolve({name: value})[name]
            except ValueError as error:
                raise invalid(field, str(error).replace(f"option {name!r}", f"{field!r}"), value) from None
        if body.num_images > self.args.max_num_images:
            raise invalid("num_images", f"must be between 1 and {self.args.max_num_images} (max_num_images), "
                                        f"got {body.num_images}", body.num_images)
        seed = body.seed if body.seed is not None else random.randint(0, MAX_SEED)
        return {"sampler": body.sampler, "steps": steps, "num_images": body.num_images, "seed": seed,
                "options": options, "class_labels": class_labels(body, info), "guidance_scale": body.guidance_scale}

    async def _respond(self, body: SampleRequest, job: dict, result: dict, received: float,
                       called: float) -> SampleResponse:
        returned = time.perf_counter()
        images = await asyncio.to_thread(encode, result["images"], body.format, body.nrow)
        done = time.perf_counter()
        labels = job["class_labels"]
        if labels is not None and len(labels) == 1:
            labels = labels * job["num_images"]
        timing = Timing(total_s=done - received, queue_s=max(returned - called - result["sample_s"], 0.0),
                        sample_s=result["sample_s"], encode_s=done - returned,
                        batch_requests=result["batch_requests"], batch_images=result["batch_images"])
        return SampleResponse(format=body.format, images=images, shape=list(result["images"].shape),
                              sampler=job["sampler"], steps=job["steps"], eta=job["options"].get("eta", 0.0),
                              options={REQUEST_FIELD.get(k, k): v for k, v in job["options"].items()},
                              seed=job["seed"], class_labels=labels, guidance_scale=job["guidance_scale"],
                              model=ModelInfo(**result["model"]), timing=timing)

    @api.post("/v1/samples", response_model=SampleResponse, responses=ERRORS)
    async def samples(self, body: SampleRequest) -> SampleResponse:
        """Generate images. Concurrent requests are admitted together (@serve.batch) and share every model call."""
        received = time.perf_counter()
        job = await self._job(body)
        called = time.perf_counter()
        result = await self._call("sample", job)
        return await self._respond(body, job, result, received, called)

    @api.post("/v1/samples/stream", responses={**ERRORS, 200: {
        "description": "NDJSON: {\"event\": \"progress\", \"step\": k, \"of\": n} per step, then "
                       "{\"event\": \"result\", ...SampleResponse} or {\"event\": \"error\", \"message\": ...}",
        "content": {"application/x-ndjson": {}}}})
    async def samples_stream(self, body: SampleRequest) -> StreamingResponse:
        """Like /v1/samples for one request, streaming its progress as newline-delimited JSON."""
        received = time.perf_counter()
        job = await self._job(body)  # bad input is still a plain 422, before the stream starts

        async def events():
            called = time.perf_counter()
            deadline = time.monotonic() + self.args.request_timeout_s
            stream = self.sampler.options(stream=True).sample_stream.remote(job)
            try:
                async for item in stream:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"request timed out after {self.args.request_timeout_s:g}s "
                                           "(request_timeout_s)")
                    if "images" in item:
                        response = await self._respond(body, job, item, received, called)
                        yield json.dumps({"event": "result", **response.model_dump()}) + "\n"
                    else:
                        yield json.dumps({"event": "progress", **item}) + "\n"
            except Exception as error:  # the status line is sent already: report in the stream
                stream.cancel()
                yield json.dumps({"event": "error", "message": f"{type(error).__name__}: {error}"[:500]}) + "\n"

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @api.post("/v1/likelihood", response_model=LikelihoodResponse, responses=ERRORS, openapi_extra={"requestBody": {
        "required": True, "content": {
            "application/json": {"schema": LikelihoodRequest.model_json_schema()},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
    async def likelihood(self, request: Request) -> LikelihoodResponse:
        """Bits/dim of image(s) under the model's ELBO: JSON {images: [base64...]} or one raw image/* body."""
        start = time.perf_counter()
        body = await _parse(request, LikelihoodRequest, raw_field="images")
        if len(body.images) > self.args.max_likelihood_images:
            raise invalid("images", f"at most {self.args.max_likelihood_images} images (max_likelihood_images), "
                                    f"got {len(body.images)}", len(body.images))
        info = await self.model_info()
        x0 = self._decode(body.images, info)
        terms = await self._call("likelihood", x0, body.seed)
        total = terms["total_bpd"]
        return LikelihoodResponse(bits_per_dim=total, prior_bpd=terms["prior_bpd"], vb_bpd=terms["vb_bpd"],
                                  decoder_bpd=terms["decoder_bpd"], mean_bits_per_dim=float(np.mean(total)),
                                  model=ModelInfo(**terms["model"]), seconds=time.perf_counter() - start)

    @api.post("/v1/interpolate", response_model=InterpolateResponse, responses=ERRORS)
    async def interpolate(self, body: InterpolateRequest) -> InterpolateResponse:
        """DDIM-encode two images to x_T, slerp `num_points` latents between them, decode each with DDIM (η = 0)."""
        start = time.perf_counter()
        info = await self.model_info()
        if body.steps > info["num_timesteps"]:
            raise invalid("steps", f"must be between 1 and T={info['num_timesteps']}, got {body.steps}", body.steps)
        x0 = self._decode(body.images, info)
        result = await self._call("interpolate", x0, body.num_points, body.steps, body.clip_denoised)
        images = await asyncio.to_thread(encode, result["images"], body.format, body.nrow or body.num_points)
        return InterpolateResponse(format=body.format, images=images, shape=list(result["images"].shape),
                                   model=ModelInfo(**result["model"]), seconds=time.perf_counter() - start)

