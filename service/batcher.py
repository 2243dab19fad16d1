"""Dynamic batcher: one bounded queue per (model, task, size bucket), batches handed to idle workers.

A queue's batch closes when it holds `max_batch_size` requests or when its oldest request has waited
`max_batch_delay_ms`; it is then dispatched as soon as a worker is idle (while all workers are busy,
requests keep joining up to the size limit). Expired requests are answered 504 before any compute;
a full queue answers 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

from service.errors import ApiError
from service.metrics import Metrics
from service.pool import Job, WorkerPool
from service.settings import Settings

QueueKey = tuple[str, str, str]  # (model, task label, size bucket)


class Batcher:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.queues: dict[QueueKey, deque[Job]] = {}
        self.pool: WorkerPool | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    # -- submitting --------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job or raise ApiError(429) when its queue is full."""
        key = (self.settings.model, job.label, job.bucket)
        queue = self.queues.setdefault(key, deque())
        if len(queue) >= self.settings.queue_size:
            retry_after = self.retry_after(job.label, len(queue))
            raise ApiError(
                429,
                "queue_full",
                f"The {job.label} queue is full ({len(queue)} requests); retry after {retry_after} s.",
                {"Retry-After": str(retry_after)},
            )
        job.enqueued = asyncio.get_running_loop().time()
        queue.append(job)
        self.metrics.queue_depth.labels(self.settings.model, job.label).inc()
        self._wake.set()

    def retry_after(self, label: str, depth: int) -> int:
        """Seconds until a queue of `depth` requests has likely drained (at least 1)."""
        assert self.pool is not None
        batches = math.ceil(depth / self.settings.max_batch_size) / max(1, len(self.pool.workers))
        return max(1, math.ceil(batches * self.pool.batch_seconds.get(label, 1.0)))

    # -- scheduling --------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = loop.time()
            self._drop_finished(now)
            if self._dispatch_ready(now):
                continue
            timeout = self._next_close(now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _drop_finished(self, now: float) -> None:
        """Remove jobs whose client is gone and answer expired ones with 504 (before any compute)."""
        for (model, label, _), queue in self.queues.items():
            if not any(job.future.done() or job.deadline <= now for job in queue):
                continue
            kept = deque()
            for job in queue:
                if job.future.done():
                    continue
                if job.deadline <= now:
                    job.future.set_exception(deadline_exceeded())
                    continue
                kept.append(job)
            self.metrics.queue_depth.labels(model, label).dec(len(queue) - len(kept))
            queue.clear()
            queue.extend(kept)

    def _ready_queue(self, now: float) -> deque[Job] | None:
        """The queue whose batch is closed and whose oldest request is the oldest, if any."""
        delay = self.settings.max_batch_delay_ms / 1e3
        best = None
        for queue in self.queues.values():
            if not queue:
                continue
            closed = len(queue) >= self.settings.max_batch_size or now - queue[0].enqueued >= delay
            if closed and (best is None or queue[0].enqueued < best[0].enqueued):
                best = queue
        return best

    def _dispatch_ready(self, now: float) -> bool:
        assert self.pool is not None
        dispatched = False
        while (worker := self.pool.idle_worker()) is not None and (
            queue := self._ready_queue(now)
        ) is not None:
            jobs = [queue.popleft() for _ in range(min(len(queue), self.settings.max_batch_size))]
            labels = (self.settings.model, jobs[0].label)
            self.metrics.queue_depth.labels(*labels).dec(len(jobs))
            self.metrics.batch_size.labels(*labels).observe(len(jobs))
            for job in jobs:
                job.dispatched = now
                self.metrics.queue_wait.labels(*labels).observe(now - job.enqueued)
            self.pool.dispatch(worker, jobs)
            dispatched = True
        return dispatched

    def _next_close(self, now: float) -> float | None:
        """Seconds until the next batch closes or the next queued request expires; None: wait for a wake."""
        assert self.pool is not None
        delay = self.settings.max_batch_delay_ms / 1e3
        times = []
        for queue in self.queues.values():
            if queue:
                if self.pool.idle_worker() is not None:
                    times.append(queue[0].enqueued + delay)
                times.append(min(job.deadline for job in queue))
        return max(0.0, min(times) - now) if times else None


def deadline_exceeded() -> ApiError:
    return ApiError(504, "deadline_exceeded", "The request's deadline passed before it could be computed.")
