"""`SamplerDeployment`: the Ray Serve deployment that holds one model. Sample requests are admitted across callers
by `@serve.batch` and handed to the engine's continuous batching (`services.engine`); this file only connects
callers' futures and progress streams to it. All model work runs on one worker thread, so the replica's event loop
stays free to admit new requests while a step computes. torch is imported inside the replica only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from services.args import AppArgs
from services.schemas import ModelInfo

log = logging.getLogger("ray.serve")

# Admitted @serve.batch batches in flight at once. With continuous batching a batch holds its slot for its whole
# reverse process, so this must not be what limits concurrency (max_ongoing_requests is).
MAX_ADMITTED_BATCHES = 64


class _QuietBatchWarning(logging.Filter):
    """Serve warns when max_batch_size × max_concurrent_batches > max_ongoing_requests; by design here (above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


logging.getLogger("ray.serve").addFilter(_QuietBatchWarning())


@dataclass(eq=False)
class _Flight:
    """A sample request inside the replica: the caller's future and progress queue around its engine trajectory."""

    trajectory: Any  # services.engine.Trajectory
    future: asyncio.Future
    batch_requests: int  # requests @serve.batch admitted together with this one
    progress: asyncio.Queue | None = None  # streaming requests: (calls done, calls in all) after every tick


def _fail(flights: list[_Flight], error: Exception) -> None:
    for f in flights:
        if not f.future.done():
            f.future.set_exception(error)


@serve.deployment(name="SamplerDeployment", max_ongoing_requests=32, health_check_period_s=5)
class SamplerDeployment:
    """Holds one model. `sample` requests are gathered across callers by @serve.batch and join the engine's set of
    trajectories in flight (`_step_loop` calls `Engine.tick` on the model thread until none is left)."""

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
        self.started_at = time.perf_counter()
        self.stepper: asyncio.Task | None = None
        self.sample.set_max_batch_size(self.args.max_batch_size)
        self.sample.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        c, h, _ = self.engine.image_shape
        num_classes = self.engine.num_classes
        class_names = None if num_classes is None else \
            list(getattr(model, "class_names", None) or (str(k) for k in range(num_classes)))
        self._info = ModelInfo(**{k: v for k, v in self.ref.to_json().items() if k != "run_id"}, image_size=h,
                               channels=c, num_timesteps=self.engine.num_timesteps, schedule=model.schedule_name,
                               device=str(device), replica=self.replica, num_classes=num_classes,
                               class_names=class_names).model_dump()
        log.info("raydiff: loaded %s (%s) on %s in %.1fs", self.ref.loaded_uri, self.ref.uri, device,
                 time.perf_counter() - start)

    def info(self) -> dict:
        return self._info

    def stats(self) -> dict:
        """Since replica start: model ticks, Σ images over ticks, seconds in ticks, wall seconds."""
        return {**self.engine.counters, "uptime_s": time.perf_counter() - self.started_at}

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _flight(self, job: dict, batch_requests: int, progress: asyncio.Queue | None = None) -> _Flight:
        """A request as a flight; a job the engine cannot start (bad sampler, option, steps or class label) fails
        alone."""
        from services.engine import SampleJob

        future = asyncio.get_running_loop().create_future()
        try:
            labels = job.get("class_labels")
            trajectory = self.engine.start(SampleJob(**{**job, "class_labels": None if labels is None else
                                                        tuple(labels)}))
        except Exception as error:
            future.set_exception(error)
            trajectory = None
        return _Flight(trajectory, future, batch_requests, progress)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_ADMITTED_BATCHES)
    async def sample(self, jobs: list[dict]) -> list[dict]:
        """jobs (SampleJob fields) gathered across callers by @serve.batch → per job {images: float32 [N, C, H, W],
        sample_s, batch_requests, batch_images}. The batch joins the stepper's in-flight set at its next tick
        (continuous batching, services.engine), so admitted batches need not be large: what bounds the requests
        in flight is max_ongoing_requests, not max_concurrent_batches."""
        flights = [self._flight(job, len(jobs)) for job in jobs]
        self._admit(flights)
        return list(await asyncio.gather(*(f.future for f in flights)))

    async def sample_stream(self, job: dict):
        """One request, streamed: yields {"step": k, "of": n} after each of its model calls, then its result dict.
        It skips @serve.batch admission but shares every model call with the requests in flight."""
        flight = self._flight(job, 1, progress=asyncio.Queue())
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
        self.admitted.extend(f for f in flights if not f.future.done())
        if self.stepper is None or self.stepper.done():
            self.stepper = asyncio.create_task(self._step_loop())

    async def _step_loop(self) -> None:
        """Advance every in-flight request by one model call per tick (on the model thread) until none is left."""
        active: list[_Flight] = []
        try:
            while active or self.admitted:
                admitted, self.admitted = self.admitted, []
                active = [f for f in active + admitted if not f.future.done()]  # drop cancelled requests
                if not active:
                    continue
                try:
                    await self._run(self.engine.tick, [f.trajectory for f in active],
                                    self.args.max_images_per_forward)
                except Exception as error:  # e.g. out of memory: fail these requests, keep the replica serving
                    log.exception("raydiff: sampling step failed")
                    _fail(active, error)
                    active = []
                    continue
                for f in active:
                    if f.progress is not None:
                        f.progress.put_nowait(f.trajectory.progress)
                    if f.trajectory.done and not f.future.done():
                        f.future.set_result(self._result(f))
                active = [f for f in active if not f.trajectory.done]
        except BaseException as error:  # a bug here must not leave callers waiting until their timeout
            _fail(active + self.admitted, error if isinstance(error, Exception) else RuntimeError("stepper stopped"))
            self.admitted = []
            raise

    def _result(self, f: _Flight) -> dict:
        tr = f.trajectory
        return {"images": self.engine.result(tr).numpy(), "sample_s": time.perf_counter() - tr.started,
                "batch_requests": f.batch_requests, "batch_images": tr.max_tick_images, "model": self._info}

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

