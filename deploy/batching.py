"""Dynamic batching in the serving process.

Requests join one queue. The batcher takes what is queued, up to `max_batch_size` texts; when the previous
batch held more than one request (requests are arriving together) it waits up to `max_wait_ms` for more
before it starts, and a lone request at low load never waits. One inference thread runs a batch at a time
(ONNX Runtime spreads it over its own threads); while it runs, the next batch gathers, so batches grow with
load by themselves.

The queue is bounded in texts (`max_queue`): a request that does not fit is refused at once (429, gRPC
RESOURCE_EXHAUSTED, `Retry-After`). A request still queued at its deadline is answered 504 and never run; one
already running is answered when its batch ends. `close()` refuses new requests (503) and `drained()` waits
until the queue is empty and the last batch answered.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from deploy import metrics
from deploy.errors import Rejected


@dataclass
class Job:
    texts: list[str]
    top_k: int
    deadline: float  # time.monotonic()
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued | running | expired


class Batcher:
    """`await submit(texts, top_k, timeout_s)` -> the predictions of `run(texts, top_k)` for those texts."""

    def __init__(self, run: Callable[[list[str], int], list[Any]], max_batch_size: int, max_wait_ms: float,
                 max_queue: int, role: str = "primary",
                 on_batch: Callable[[list[str], list[Any], float], None] | None = None):  # fmt: skip
        self.run, self.max_batch, self.max_wait = run, max_batch_size, max_wait_ms / 1000.0
        self.max_queue, self.role, self.on_batch = max_queue, role, on_batch
        self.pending: deque[Job] = deque()
        self.queued_texts = 0
        self.running = False
        self.closed = False
        self.last_requests = 0  # requests in the previous batch: more than 1 means they arrive together
        self.seconds_per_text = 0.001  # a running estimate, for Retry-After
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{role}")
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.loop(), name=f"batcher-{self.role}")

    async def submit(self, texts: list[str], top_k: int, timeout_s: float) -> list[Any]:
        if self.closed or self.task is None:
            metrics.REJECTS.labels("draining").inc()
            raise Rejected(503, "the server is shutting down; retry on another replica", "draining")
        if self.queued_texts + len(texts) > self.max_queue:
            metrics.REJECTS.labels("overloaded").inc()
            wait = max(1, math.ceil(self.queued_texts * self.seconds_per_text))
            raise Rejected(429, f"overloaded: {self.queued_texts} texts queued (serve.max_queue: {self.max_queue}); "
                           f"retry after {wait} s", "overloaded", {"Retry-After": str(wait)})  # fmt: skip
        job = Job(texts, top_k, time.monotonic() + timeout_s, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.queued_texts += len(texts)
        metrics.QUEUE_DEPTH.labels(self.role).set(self.queued_texts)
        assert self.wakeup is not None
        self.wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            if job.state == "queued":
                self.expire(job)
                raise self.deadline_error(timeout_s) from None
            return await job.future  # already running: its batch answers it

    def deadline_error(self, timeout_s: float) -> Rejected:
        metrics.REJECTS.labels("deadline").inc()
        return Rejected(504, f"deadline exceeded: still queued after {timeout_s * 1000:.0f} ms (serve.timeout_ms or "
                        "the X-Request-Timeout-Ms header)", "deadline")  # fmt: skip

    def expire(self, job: Job) -> None:
        job.state = "expired"
        self.queued_texts -= len(job.texts)
        metrics.QUEUE_DEPTH.labels(self.role).set(self.queued_texts)

    def take(self) -> list[Job]:
        """Queued jobs up to `max_batch` texts (a single larger request runs alone, chunked by the model)."""
        batch: list[Job] = []
        texts = 0
        now = time.monotonic()
        while self.pending:
            job = self.pending[0]
            if job.state != "queued":
                self.pending.popleft()
                continue
            if now >= job.deadline:
                self.pending.popleft()
                self.expire(job)
                if not job.future.done():
                    job.future.set_exception(self.deadline_error(job.deadline - job.enqueued))
                continue
            if batch and texts + len(job.texts) > self.max_batch:
                break
            self.pending.popleft()
            batch.append(job)
            texts += len(job.texts)
        for job in batch:
            job.state = "running"
            self.queued_texts -= len(job.texts)
        metrics.QUEUE_DEPTH.labels(self.role).set(self.queued_texts)
        return batch

    async def gather_more(self) -> None:
        """Wait up to max_wait for the queue to hold a full batch, when requests are arriving together."""
        assert self.wakeup is not None
        end = time.monotonic() + self.max_wait
        while self.last_requests > 1 and self.queued_texts < self.max_batch and not self.closed:
            left = end - time.monotonic()
            if left <= 0:
                return
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=left)
            except TimeoutError:
                return

    async def loop(self) -> None:
        assert self.wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            if self.max_wait > 0:
                await self.gather_more()
            batch = self.take()
            if not batch:
                continue
            await self.run_batch(loop, batch)

    async def run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        texts = [t for job in batch for t in job.texts]
        top_k = max(job.top_k for job in batch)
        start = time.monotonic()
        for job in batch:
            metrics.QUEUE_WAIT.observe(start - job.enqueued)
        metrics.BATCH_TEXTS.observe(len(texts))
        self.running, self.last_requests = True, len(batch)
        try:
            results = await loop.run_in_executor(self.pool, self.run, texts, top_k)
        except Exception as exc:  # noqa: BLE001 - a model failure fails this batch's requests, not the server
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.running = False
        seconds = time.monotonic() - start
        metrics.MODEL_SECONDS.labels(self.role).observe(seconds)
        self.seconds_per_text = 0.8 * self.seconds_per_text + 0.2 * seconds / len(texts)
        at = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(results[at : at + len(job.texts)])
            at += len(job.texts)
        if self.on_batch is not None:
            self.on_batch(texts, results, seconds)

    def close(self) -> None:
        self.closed = True
        if self.wakeup is not None:
            self.wakeup.set()

    async def drained(self, timeout_s: float) -> bool:
        """True once nothing is queued or running (within `timeout_s`)."""
        end = time.monotonic() + timeout_s
        while (self.queued_texts > 0 or self.running) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self.queued_texts == 0 and not self.running
