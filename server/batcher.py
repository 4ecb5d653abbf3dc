"""Dynamic batching: one worker owns the engine; concurrent requests share its batches.

- /continue requests queue up; the worker takes up to `max_batch` of them, waiting at most
  `max_wait` after the oldest arrived, and runs them as ONE `engine.continue_batch` call
  (parameters may differ per request).
- Edits (/inpaint, /vary: `engine.edit_batch`; /loop: `engine.loop_batch`) queue the same way
  and run in batches of one kind, taken after each continue batch.
- /extend streams are advanced one chunk per turn, between continue batches, so a long
  extension does not lock everyone else out for its whole length.
- Every engine call runs on a single dedicated thread: the event loop keeps answering (health,
  uploads, metrics) and the engine (CUDA context, /extend generators) is only touched by one
  thread.
- A client that goes away marks its job cancelled; the worker skips it (or discards the result
  if it was already running). An engine exception fails the jobs of that call only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from model.engine import JOIN_SAMPLES
from server.errors import QueueFull, Unavailable
from server.metrics import Metrics

log = logging.getLogger("server")


@dataclass(eq=False)
class ContinueJob:
    audio: np.ndarray  # (T,) float32 at the codec rate
    params: object  # SamplingParams, seed already fixed
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    style: object = None  # a model.engine.StyleRequest, resolved on the engine thread


@dataclass(eq=False)
class EditJob:
    kind: str  # "edit" (an EditRequest for engine.edit_batch) or "loop" (audio for loop_batch)
    request: object
    params: object
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False


@dataclass(eq=False)
class ExtendJob:
    audio: np.ndarray
    params: object
    n_chunks: int
    chunks: asyncio.Queue  # np.ndarray per chunk, then None; or an exception
    produced: int = 0
    iterator: object = None  # engine.extend(...) generator, created on the engine thread
    cancelled: bool = False
    style: object = None  # a model.engine.StyleRequest, resolved on the engine thread


def _engine_fault(kind: str, exc: BaseException) -> Unavailable:
    # A CUDA OOM or any other engine failure: the caller may retry; details go to the log.
    return Unavailable(
        f"the engine failed on this {kind} ({type(exc).__name__}); retry shortly",
        code="engine_error",
    )


class Batcher:
    def __init__(
        self, engine, metrics: Metrics, max_batch: int, max_wait_ms: float, max_queue: int
    ):
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self._continues: deque[ContinueJob] = deque()
        self._edits: deque[EditJob] = deque()
        self._extends: deque[ExtendJob] = deque()  # streams whose next chunk is due
        self._streams: set[ExtendJob] = set()  # every unfinished stream, incl. the running one
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._batch_seconds = 1.0  # running estimate of one engine call, for Retry-After
        self._running: list[ContinueJob] = []  # the batch inside the engine right now

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")
        self._task.add_done_callback(self._worker_stopped)

    def _worker_stopped(self, task: asyncio.Task) -> None:
        # Only a bug gets here (engine faults are caught per call). Fail what waits instead of
        # leaving it hanging; /health then reports the dead worker so the process is restarted.
        if self._closing or task.cancelled() or task.exception() is None:
            return
        log.error("the batching worker died", exc_info=task.exception())
        dead = Unavailable(
            "the engine worker stopped; the server needs a restart", code="worker_down"
        )
        for job in [*self._continues, *self._edits, *self._running]:
            if not job.future.done():
                job.future.set_exception(dead)
        for job in self._streams:
            job.chunks.put_nowait(dead)
        self._continues.clear()
        self._edits.clear()
        self._extends.clear()
        self._streams.clear()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run_on_engine(self, fn, *args):
        """Run `fn(*args)` on the engine thread (used for warmup)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        self._closing = True
        gone = Unavailable("the server is shutting down", code="shutting_down")
        for job in [*self._continues, *self._edits, *self._running]:
            if not job.future.done():
                job.future.set_exception(gone)
        for job in self._streams:
            job.chunks.put_nowait(gone)
        self._continues.clear()
        self._edits.clear()
        self._extends.clear()
        self._streams.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # a worker that died was logged then
                pass
        # A running engine call cannot be interrupted; do not hold shutdown hostage to it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- submission (event loop) ---------------------------------------------------------------

    def depth(self) -> int:
        return len(self._continues) + len(self._edits) + len(self._streams)

    def _admit(self) -> None:
        if self._closing:
            raise Unavailable("the server is shutting down", code="shutting_down")
        if not self.alive:
            raise Unavailable("the engine worker is not running", code="not_ready")
        if self.depth() >= self.max_queue:
            self.metrics.rejected.inc()
            # Roughly when a slot frees up: the queue drains max_batch per engine call.
            wait = math.ceil(self.depth() / self.max_batch * self._batch_seconds)
            raise QueueFull(
                f"the server is busy ({self.depth()} requests waiting); retry shortly",
                retry_after=max(1, wait),
            )

    def check_capacity(self) -> None:
        """Cheap early refusal, before an upload is decoded."""
        self._admit()

    def submit_continue(self, audio: np.ndarray, params, style=None) -> ContinueJob:
        self._admit()
        job = ContinueJob(audio, params, asyncio.get_running_loop().create_future(), style=style)
        self._continues.append(job)
        self._changed()
        return job

    def submit_edit(self, kind: str, request, params) -> EditJob:
        self._admit()
        job = EditJob(kind, request, params, asyncio.get_running_loop().create_future())
        self._edits.append(job)
        self._changed()
        return job

    def submit_extend(self, audio: np.ndarray, params, n_chunks: int, style=None) -> ExtendJob:
        self._admit()
        job = ExtendJob(audio, params, n_chunks, asyncio.Queue(), style=style)
        self._extends.append(job)
        self._streams.add(job)
        self._changed()
        return job

    def cancel(self, job: ContinueJob | ExtendJob) -> None:
        if job.cancelled:
            return
        job.cancelled = True
        if isinstance(job, ContinueJob) and job in self._continues:
            self._continues.remove(job)
            self.metrics.dropped.inc()
        if isinstance(job, EditJob) and job in self._edits:
            self._edits.remove(job)
            self.metrics.dropped.inc()
        if isinstance(job, ExtendJob) and job in self._streams:
            self._streams.discard(job)
            self.metrics.dropped.inc()
            if job in self._extends:  # not running now: close its generator on the engine thread
                self._extends.remove(job)
                self._executor.submit(self._close_iterator, job)
        self._changed()

    def _changed(self) -> None:
        self.metrics.queue_depth.set(self.depth())
        self._wake.set()

    # -- the worker ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._continues and not self._edits and not self._extends:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._continues:
                batch = await self._collect()
                if batch:
                    await self._run_batch(batch)
            if self._edits:
                await self._run_edits()
            if self._extends:
                await self._step_extend(self._extends.popleft())

    async def _collect(self) -> list[ContinueJob]:
        """Take up to max_batch jobs, waiting until the oldest has waited max_wait."""
        deadline = self._continues[0].enqueued + self.max_wait
        while len(self._continues) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
            if not self._continues:  # everything waiting was cancelled
                return []
        batch = [
            self._continues.popleft() for _ in range(min(self.max_batch, len(self._continues)))
        ]
        self.metrics.queue_depth.set(self.depth())
        return batch

    def _engine_batch(self, batch: list[ContinueJob]) -> list[np.ndarray]:
        """On the engine thread: arrays in, arrays out (conversions included, so any failure
        is caught like an engine fault)."""
        audios = [torch.from_numpy(j.audio) for j in batch]
        # Every result comes with the decoded end of its input in front (JOIN_SAMPLES): the
        # route crossfades into it for include_input, or drops it.
        styles = [j.style for j in batch]
        outs = (self.engine.continue_batch(audios, [j.params for j in batch], lead_in=JOIN_SAMPLES)
                if all(s is None for s in styles) else  # engines and fakes without styles
                self.engine.continue_batch(audios, [j.params for j in batch],
                                           lead_in=JOIN_SAMPLES, styles=styles))
        if len(outs) != len(batch):
            raise RuntimeError(f"engine returned {len(outs)} results for {len(batch)} requests")
        return [o.detach().cpu().float().numpy() for o in outs]

    async def _run_batch(self, batch: list[ContinueJob]) -> None:
        self.metrics.batch_size.observe(len(batch))
        self._running = batch
        start = time.perf_counter()
        try:
            outs = await self.run_on_engine(self._engine_batch, batch)
        except Exception as e:  # noqa: BLE001 - any engine fault fails this batch, not the server
            log.exception("engine failed on a batch of %d", len(batch))
            self.metrics.engine_errors.labels("continue").inc()
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(_engine_fault("batch", e))
            return
        finally:
            self._running = []
            took = time.perf_counter() - start
            self.metrics.engine_seconds.labels("continue").observe(took)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * took
        for j, out in zip(batch, outs, strict=True):
            if not j.future.done():  # a cancelled request's result is simply dropped
                j.future.set_result(out)

    async def _run_edits(self) -> None:
        """One engine call for up to max_batch waiting edits of the first one's kind."""
        kind = self._edits[0].kind
        batch = [j for j in self._edits if j.kind == kind][: self.max_batch]
        for j in batch:
            self._edits.remove(j)
        self.metrics.queue_depth.set(self.depth())

        def run():
            if kind == "loop":
                outs = self.engine.loop_batch([torch.from_numpy(j.request) for j in batch],
                                              [j.params for j in batch])
            else:
                outs = self.engine.edit_batch([j.request for j in batch])
            return [o.detach().cpu().float().numpy() for o in outs]

        self._running = batch
        start = time.perf_counter()
        try:
            outs = await self.run_on_engine(run)
        except Exception as e:  # noqa: BLE001 - an engine fault fails this batch only
            log.exception("engine failed on a batch of %d %s requests", len(batch), kind)
            self.metrics.engine_errors.labels(kind).inc()
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(_engine_fault(kind, e))
            return
        finally:
            self._running = []
            self.metrics.engine_seconds.labels(kind).observe(time.perf_counter() - start)
        for j, out in zip(batch, outs, strict=True):
            if not j.future.done():
                j.future.set_result(out)

    async def _step_extend(self, job: ExtendJob) -> None:
        if job.cancelled:
            return

        def step():
            if job.iterator is None:
                job.iterator = iter(
                    self.engine.extend(torch.from_numpy(job.audio), job.n_chunks, job.params,
                                       lead_in=JOIN_SAMPLES,
                                       **({} if job.style is None else {"style": job.style}))
                )
            # StopIteration must not cross into a Future; an early end is an engine fault.
            chunk = next(job.iterator, None)
            if chunk is None:
                raise RuntimeError(
                    f"engine.extend ended after {job.produced} of {job.n_chunks} chunks"
                )
            return chunk

        start = time.perf_counter()
        try:
            chunk = await self.run_on_engine(step)
        except Exception as e:  # noqa: BLE001
            log.exception("engine failed on an /extend chunk")
            self.metrics.engine_errors.labels("extend").inc()
            job.chunks.put_nowait(_engine_fault("extend chunk", e))
            self._streams.discard(job)
            self._changed()
            return
        finally:
            self.metrics.engine_seconds.labels("extend").observe(time.perf_counter() - start)
        job.produced += 1
        job.chunks.put_nowait(chunk.detach().cpu().float().numpy())
        if job.produced >= job.n_chunks or job.cancelled:
            job.chunks.put_nowait(None)
            self._streams.discard(job)
            await self.run_on_engine(self._close_iterator, job)
        else:
            self._extends.append(job)  # back of the line: continues and other streams go first
        self._changed()

    @staticmethod
    def _close_iterator(job: ExtendJob) -> None:
        close = getattr(job.iterator, "close", None)
        if close is not None:
            close()
