"""The Ray Serve application: a FastAPI `Ingress` (HTTP, validation, encoding) in front of `SamplerDeployment`
(the model, batched with `@serve.batch`).

    POST /v1/samples   DDPM/DDIM samples (png | npy | grid), batched across callers
    POST /v1/samples/stream   the same for one request, with per-step progress (NDJSON)
    POST /v1/likelihood   ELBO bits/dim of uploaded images
    POST /v1/interpolate  DDIM-encode two images, slerp the latents, decode
    GET  /v1/models, /healthz, /readyz, / (a small page to try the sampler), /docs (OpenAPI)

Built by `build_app(args)` (what `serve run`/`serve deploy` import: `services.app:build_app`); `args` are
`AppArgs`. The model is loaded from MLflow when a SamplerDeployment replica starts, so a redeploy of
`models:/NAME@champion` serves whatever is champion then; Serve's rolling update lets old replicas finish their
in-flight requests first (graceful_shutdown_timeout_s = request_timeout_s), and the ingress retries a request
whose replica died (the seed is fixed before the first try, so a retry returns the same images).
"""

# No `from __future__ import annotations` here: FastAPI must see the real request types when Serve rebuilds
# the ingress class in the replica.
import asyncio
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import codec
from services.page import INDEX_HTML
from services.schemas import (
    MAX_SEED,
    ErrorBody,
    InterpolateRequest,
    InterpolateResponse,
    LikelihoodRequest,
    LikelihoodResponse,
    ModelInfo,
    SampleRequest,
    SampleResponse,
    Timing,
)

log = logging.getLogger("ray.serve")

# Admitted @serve.batch batches in flight at once. With continuous batching a batch holds its slot for its whole
# reverse process, so this must not be what limits concurrency (max_ongoing_requests is).
MAX_ADMITTED_BATCHES = 64


class _QuietBatchWarning(logging.Filter):
    """Serve warns when max_batch_size × max_concurrent_batches > max_ongoing_requests; by design here (above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


logging.getLogger("ray.serve").addFilter(_QuietBatchWarning())

RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
INFO_TTL_S = 30.0


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` block of a Serve config). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_uri: str = Field(min_length=1, description="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/model")
    tracking_uri: str | None = Field(None, description="MLflow tracking (and registry) URI; None: $MLFLOW_TRACKING_URI")
    max_batch_size: int = Field(16, ge=1, description="requests merged into one batched reverse process")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_num_images: int = Field(64, ge=1)
    request_timeout_s: float = Field(300.0, gt=0.0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    # Beyond the contract's fields (all optional):
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per SamplerDeployment replica")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (None: Ray's "
                                                              "OMP_NUM_THREADS, i.e. num_cpus)")
    ingress_replicas: int = Field(1, ge=1)
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger request bodies get 413")
    max_likelihood_images: int = Field(16, ge=1)
    max_images_per_forward: int = Field(1024, ge=1, description="larger in-flight sets run the model in chunks")

    def model_post_init(self, _context: Any) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")


# ---------------------------------------------------------------------------------------------- model replica


@dataclass(eq=False)
class _Flight:
    """A sample request inside the replica: its job, the caller's future and its trajectory once started."""

    job: Any
    future: asyncio.Future
    batch_requests: int  # requests @serve.batch admitted together with this one
    trajectory: Any = None
    started: float = 0.0
    max_tick_images: int = 0  # the largest model call (in images) this request took part in
    progress: asyncio.Queue | None = None  # streaming requests: (steps done, steps) after every tick


def _fail(flights: list[_Flight], error: Exception) -> None:
    for f in flights:
        if not f.future.done():
            f.future.set_exception(error)


@serve.deployment(name="SamplerDeployment", max_ongoing_requests=32, health_check_period_s=5)
class SamplerDeployment:
    """Holds one model. `sample` requests are gathered across callers by @serve.batch and join one continuously
    batched set of reverse processes (`_step_loop`); all model work runs on one worker thread, so the replica's
    event loop stays free to admit new requests while a step computes."""

    def __init__(self, args: dict):
        import ray
        import torch

        from services.engine import Engine, resolve_device
        from services.loading import load

        self.args = AppArgs.model_validate(args)
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        device = resolve_device(self.args.device)
        start = time.perf_counter()
        model, self.ref = load(self.args.model_uri, self.args.tracking_uri, device)
        self.engine = Engine(model, device)
        self.replica = ray.get_runtime_context().get_actor_name()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydiff-model")
        self.admitted: list[_Flight] = []
        self.counters = {"ticks": 0, "tick_images": 0, "busy_s": 0.0}
        self.started_at = time.perf_counter()
        self.stepper: asyncio.Task | None = None
        self.sample.set_max_batch_size(self.args.max_batch_size)
        self.sample.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        c, h, _ = self.engine.image_shape
        self._info = ModelInfo(**{k: v for k, v in self.ref.to_json().items() if k != "run_id"}, image_size=h,
                               channels=c, num_timesteps=self.engine.num_timesteps, schedule=model.schedule_name,
                               device=str(device), replica=self.replica).model_dump()
        log.info("raydiff: loaded %s (%s) on %s in %.1fs", self.ref.loaded_uri, self.ref.uri, device,
                 time.perf_counter() - start)

    def info(self) -> dict:
        return self._info

    def stats(self) -> dict:
        """Since replica start: model ticks, Σ images over ticks, seconds in ticks, wall seconds."""
        return {**self.counters, "uptime_s": time.perf_counter() - self.started_at}

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_ADMITTED_BATCHES)
    async def sample(self, jobs: list[dict]) -> list[dict]:
        """jobs (SampleJob fields) gathered across callers by @serve.batch → per job {images: float32 [N, C, H, W],
        sample_s, batch_requests, batch_images}. The batch joins the stepper's in-flight set at its next tick
        (continuous batching, services.engine), so admitted batches need not be large: what bounds the requests
        in flight is max_ongoing_requests, not max_concurrent_batches."""
        from services.engine import SampleJob

        loop = asyncio.get_running_loop()
        flights = [_Flight(SampleJob(**job), loop.create_future(), len(jobs)) for job in jobs]
        self._admit(flights)
        return list(await asyncio.gather(*(f.future for f in flights)))

    async def sample_stream(self, job: dict):
        """One request, streamed: yields {"step": k, "of": n} after each of its steps, then its result dict.
        It skips @serve.batch admission but shares every model call with the requests in flight."""
        from services.engine import SampleJob

        flight = _Flight(SampleJob(**job), asyncio.get_running_loop().create_future(), 1, progress=asyncio.Queue())
        self._admit([flight])
        try:
            while not flight.future.done():
                getter = asyncio.ensure_future(flight.progress.get())
                await asyncio.wait([getter, flight.future], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    yield {"step": done, "of": total}
                else:
                    getter.cancel()
            yield flight.future.result()
        finally:
            if not flight.future.done():  # the caller went away: drop the trajectory at the next tick
                flight.future.cancel()

    def _admit(self, flights: list[_Flight]) -> None:
        self.admitted.extend(flights)
        if self.stepper is None or self.stepper.done():
            self.stepper = asyncio.create_task(self._step_loop())

    async def _step_loop(self) -> None:
        """Advance every in-flight request one step per tick (on the model thread) until none is left."""
        active: list[_Flight] = []
        try:
            while active or self.admitted:
                admitted, self.admitted = self.admitted, []
                active = [f for f in active + admitted if not f.future.done()]  # drop cancelled requests
                if not active:
                    continue
                try:
                    finished = await self._run(self._tick, active)
                except Exception as error:  # e.g. out of memory: fail these requests, keep the replica serving
                    log.exception("raydiff: sampling step failed")
                    _fail(active, error)
                    active = []
                    continue
                for f in active:
                    if f.progress is not None and f.trajectory is not None:
                        f.progress.put_nowait((f.job.steps - f.trajectory.i - 1, f.job.steps))
                for f, outcome in finished:
                    if f.future.done():
                        continue
                    if isinstance(outcome, Exception):
                        f.future.set_exception(outcome)
                    else:
                        f.future.set_result({"images": outcome, "sample_s": time.perf_counter() - f.started,
                                             "batch_requests": f.batch_requests, "batch_images": f.max_tick_images,
                                             "model": self._info})
                active = [f for f in active if f.trajectory is not None and not f.trajectory.done]
        except BaseException as error:  # a bug here must not leave callers waiting until their timeout
            _fail(active + self.admitted, error if isinstance(error, Exception) else RuntimeError("stepper stopped"))
            self.admitted = []
            raise

    def _tick(self, active: list[_Flight]) -> list[tuple[_Flight, Any]]:
        """Model thread: start newly admitted trajectories, one step for all → (flight, images or exception) for
        those that finished or could not start."""
        done: list[tuple[_Flight, Any]] = []
        for f in active:
            if f.trajectory is None:
                try:
                    f.trajectory, f.started = self.engine.start(f.job), time.perf_counter()
                except Exception as error:  # a bad job fails alone
                    done.append((f, error))
        running = [f for f in active if f.trajectory is not None and not f.trajectory.done]
        if not running:
            return done
        images = sum(f.job.num_images for f in running)
        start = time.perf_counter()
        self.engine.tick([f.trajectory for f in running], self.args.max_images_per_forward)
        self.counters["ticks"] += 1
        self.counters["tick_images"] += images
        self.counters["busy_s"] += time.perf_counter() - start
        for f in running:
            f.max_tick_images = max(f.max_tick_images, images)
            if f.trajectory.done:
                done.append((f, self.engine.result(f.trajectory).numpy()))
        return done

    async def likelihood(self, images: np.ndarray, seed: int) -> dict:
        import torch

        terms = await self._run(self.engine.likelihood, torch.from_numpy(images), seed)
        return {**terms, "model": self._info}

    async def interpolate(self, images: np.ndarray, num_points: int, steps: int, clip_denoised: bool) -> dict:
        import torch

        out = await self._run(self.engine.interpolate, torch.from_numpy(images), num_points, steps, clip_denoised)
        return {"images": out.numpy(), "model": self._info}

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("model not loaded")


# ---------------------------------------------------------------------------------------------- HTTP ingress

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
        import services.app

        services.app.BODY_LIMIT["bytes"] = self.args.max_body_bytes
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
        """The served model: registry name, version and alias, image size, T and the training run id."""
        self._info = await self._call("info")
        self._info_at = time.monotonic()
        return [self._info]

    async def _job(self, body: SampleRequest) -> dict:
        """The request as SampleJob fields, after the checks that need the model (T) or the app's limits."""
        info = await self.model_info()
        T = info["num_timesteps"]
        steps = body.steps if body.steps is not None else (T if body.sampler == "ddpm" else min(50, T))
        if steps > T:
            raise invalid("steps", f"must be between 1 and T={T} for this model, got {steps}", steps)
        if body.sampler == "ddpm" and body.eta != 0:
            raise invalid("eta", "applies only to sampler 'ddim'; leave it 0 for 'ddpm'", body.eta)
        if body.num_images > self.args.max_num_images:
            raise invalid("num_images", f"must be between 1 and {self.args.max_num_images} (max_num_images), "
                                        f"got {body.num_images}", body.num_images)
        seed = body.seed if body.seed is not None else random.randint(0, MAX_SEED)
        return {"sampler": body.sampler, "steps": steps, "num_images": body.num_images, "seed": seed,
                "eta": float(body.eta), "clip_denoised": body.clip_denoised}

    async def _respond(self, body: SampleRequest, job: dict, result: dict, received: float,
                       called: float) -> SampleResponse:
        returned = time.perf_counter()
        images = await asyncio.to_thread(encode, result["images"], body.format, body.nrow)
        done = time.perf_counter()
        timing = Timing(total_s=done - received, queue_s=max(returned - called - result["sample_s"], 0.0),
                        sample_s=result["sample_s"], encode_s=done - returned,
                        batch_requests=result["batch_requests"], batch_images=result["batch_images"])
        return SampleResponse(format=body.format, images=images, shape=list(result["images"].shape),
                              sampler=job["sampler"], steps=job["steps"], eta=job["eta"], seed=job["seed"],
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


# ---------------------------------------------------------------------------------------------- builder


def _wants_gpu(device: str) -> bool:
    if device == "cuda":
        return True
    if device == "cpu":
        return False
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict) -> serve.Application:
    """`services.app:build_app` — the two deployments bound to `AppArgs(**args)`."""
    a = AppArgs.model_validate(args)
    if a.tracking_uri and a.tracking_uri.startswith("sqlite:///") and not a.tracking_uri[10:].startswith("/"):
        # a relative sqlite path (configs/serve-local.yaml) means relative to where the app is built; replicas
        # run in other working directories
        a = a.model_copy(update={"tracking_uri": "sqlite:///" + os.path.abspath(a.tracking_uri[10:])})
    scaling: dict[str, Any] = (
        {"num_replicas": a.min_replicas} if a.min_replicas == a.max_replicas and a.min_replicas > 0 else
        {"autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                "target_ongoing_requests": a.max_batch_size}})
    sampler = SamplerDeployment.options(
        max_ongoing_requests=2 * a.max_batch_size,  # ≥ max_batch_size so batches fill, plus one batch queued
        graceful_shutdown_timeout_s=a.request_timeout_s,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": 1 if _wants_gpu(a.device) else 0},
        **scaling,
    ).bind(a.model_dump())
    return Ingress.options(
        num_replicas=a.ingress_replicas,
        max_ongoing_requests=max(128, 4 * a.max_batch_size),
        ray_actor_options={"num_cpus": 0.5},
    ).bind(sampler, a.model_dump())
