"""Worker processes as seen from the gateway: start, dispatch a batch, collect results, restart the dead.

Each worker owns one duplex pipe, watched by the event loop itself (`add_reader`): a message becomes a
callback, and the end of the pipe is how a death shows. Small batches are sent directly (they fit the
socket buffer); large ones are sent from a thread so the loop never waits on a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np

from service.errors import ApiError
from service.metrics import Metrics
from service.settings import Settings
from service.worker import worker_main

logger = logging.getLogger("openset.pool")

DIRECT_SEND_BYTES = 128 * 1024  # well under a Unix socket's send buffer: the send cannot block


def payload_bytes(jobs: list[Job]) -> int:
    """Rough size of a batch message: its image bytes and arrays."""
    total = 0
    for job in jobs:
        for value in job.item.values():
            if isinstance(value, bytes | np.ndarray):
                total += len(value) if isinstance(value, bytes) else value.nbytes
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


@dataclass
class Job:
    """One request waiting for a worker. `item` is the plain-data payload the worker reads."""

    task: str  # worker handler: segment, refer, caption, retrieve, embed_image, embed_text, encode_text
    label: str  # metrics task label: panoptic, semantic, instance, refer, ...
    options: dict
    bucket: str
    item: dict
    deadline: float  # loop time
    request_id: str
    future: asyncio.Future
    enqueued: float = 0.0
    dispatched: float = 0.0


@dataclass
class Batch:
    batch_id: int
    task: str
    label: str
    options: dict
    jobs: list[Job]
    dispatched: float = field(default_factory=time.perf_counter)


@dataclass
class Worker:
    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    generation: int = 0
    ready: bool = False
    batch: Batch | None = None
    failures: int = 0  # consecutive deaths before becoming ready (drives the restart backoff)


def worker_count(settings: Settings) -> int:
    """One worker per visible GPU with device "cuda"; `settings.workers` on CPU or one named GPU."""
    if settings.device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return settings.workers


class WorkerPool:
    """The gateway's worker processes; `on_idle` is called whenever a worker can take a batch."""

    def __init__(self, settings: Settings, metrics: Metrics, on_idle: Callable[[], None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_idle = on_idle
        self.context = multiprocessing.get_context("spawn")
        self.workers = [Worker(index) for index in range(worker_count(settings))]
        self.model_id: str | None = None
        self.info: dict = {}
        self.stopping = False
        self._next_batch_id = 0
        self.batch_seconds: dict[str, float] = {}  # moving average of batch compute time per task label
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self.alive = metrics.workers_alive.labels(settings.model)
        self.alive.set(0)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for worker in self.workers:
            await self._spawn(worker)

    def _worker_config(self, worker: Worker) -> dict:
        settings = self.settings
        device = settings.device
        if device == "cuda":
            device = f"cuda:{worker.index}"
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // len(self.workers))
        return {
            "model": settings.model,
            "checkpoint": settings.checkpoint,
            "device": device,
            "runtime": settings.runtime,
            "precision": settings.precision,
            "max_image_pixels": settings.max_image_pixels,
            "torch_threads": threads,
        }

    async def _spawn(self, worker: Worker) -> None:
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker_main,
            args=(child_conn, self._worker_config(worker)),
            name=f"openset-worker-{worker.index}",
            daemon=True,
        )
        await asyncio.to_thread(process.start)
        child_conn.close()  # so the pipe reports EOF when the worker dies
        worker.generation += 1
        worker.process, worker.conn, worker.ready, worker.batch = process, parent_conn, False, None
        assert self._loop is not None
        self._loop.add_reader(parent_conn.fileno(), self._readable, worker, parent_conn, worker.generation)
        logger.info("worker started", extra={"worker": worker.index, "pid": process.pid})

    def _readable(self, worker: Worker, conn: Connection, generation: int) -> None:
        """The worker's pipe has data: handle every waiting message, or the worker's death at EOF."""
        assert self._loop is not None
        try:
            while True:
                self._on_message(worker, generation, conn.recv())
                if not conn.poll():
                    return
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())
            conn.close()
            self._on_exit(worker, generation)

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask every worker to stop, then kill the ones still running after `timeout` seconds."""
        self.stopping = True
        for worker in self.workers:
            if worker.conn is not None:
                with contextlib.suppress(OSError):
                    worker.conn.send({"kind": "stop"})
        for worker in self.workers:
            if worker.process is not None:
                await asyncio.to_thread(worker.process.join, timeout)
                if worker.process.is_alive():
                    worker.process.kill()
                    await asyncio.to_thread(worker.process.join, 1.0)
        self.alive.set(0)

    # -- state -------------------------------------------------------------------------------------

    @property
    def ready_count(self) -> int:
        return sum(worker.ready for worker in self.workers)

    def idle_worker(self) -> Worker | None:
        for worker in self.workers:
            if worker.ready and worker.batch is None:
                return worker
        return None

    # -- batches -----------------------------------------------------------------------------------

    def dispatch(self, worker: Worker, jobs: list[Job]) -> Batch:
        """Hand `jobs` (one task, one options dict) to an idle worker."""
        self._next_batch_id += 1
        first = jobs[0]
        batch = Batch(self._next_batch_id, first.task, first.label, first.options, jobs)
        worker.batch = batch
        message = {
            "kind": "batch",
            "batch_id": batch.batch_id,
            "task": batch.task,
            "options": batch.options,
            "items": [job.item for job in jobs],
        }
        if payload_bytes(jobs) < DIRECT_SEND_BYTES:
            self._send(worker, message)
        else:
            self._keep(asyncio.ensure_future(asyncio.to_thread(self._send, worker, message)))
        return batch

    def _send(self, worker: Worker, message: dict) -> None:
        try:
            worker.conn.send(message)
        except (OSError, ValueError, AttributeError):
            # The worker is gone; the end of its pipe reports the death and fails the batch.
            logger.warning("sending a batch failed", extra={"worker": worker.index})

    def _on_message(self, worker: Worker, generation: int, message: dict) -> None:
        if generation != worker.generation:
            return
        kind = message["kind"]
        if kind == "ready":
            worker.ready, worker.failures = True, 0
            self.model_id, self.info = message["model_id"], message["info"]
            self.alive.inc()
            logger.info("worker ready", extra={"worker": worker.index, "model_id": self.model_id})
            self.on_idle()
        elif kind == "fatal":
            logger.error(
                "worker failed to load the model",
                extra={"worker": worker.index, "error": message["message"], "trace": message.get("trace")},
            )
        elif kind == "result":
            batch = worker.batch
            worker.batch = None
            if batch is not None and batch.batch_id == message["batch_id"]:
                self._complete(batch, message)
            self.on_idle()

    def _complete(self, batch: Batch, message: dict) -> None:
        labels = (self.settings.model, batch.label)
        self.metrics.inference_duration.labels(*labels).observe(message["compute_s"])
        previous = self.batch_seconds.get(batch.label, message["compute_s"])
        self.batch_seconds[batch.label] = 0.8 * previous + 0.2 * message["compute_s"]
        for job, result in zip(batch.jobs, message["results"], strict=True):
            if job.future.done():
                continue  # the client gave up (deadline) while the batch ran
            if result["ok"]:
                result["batch_size"] = len(batch.jobs)
                job.future.set_result(result)
            else:
                job.future.set_exception(ApiError(result["status"], result["code"], result["message"]))

    def _on_exit(self, worker: Worker, generation: int) -> None:
        """The worker's pipe closed: fail its batch at once (503) and start a replacement."""
        if generation != worker.generation:
            return
        if worker.ready:
            self.alive.dec()
        was_ready, worker.ready = worker.ready, False
        batch, worker.batch = worker.batch, None
        if batch is not None:
            for job in batch.jobs:
                if not job.future.done():
                    job.future.set_exception(
                        ApiError(
                            503,
                            "worker_died",
                            "The worker running this request died; retry.",
                            {"Retry-After": "1"},
                        )
                    )
        process = worker.process
        if process is not None:
            self._keep(asyncio.ensure_future(asyncio.to_thread(process.join, 5.0)))
        if self.stopping:
            return
        exitcode = process.exitcode if process is not None else None
        logger.error(
            "worker died",
            extra={
                "worker": worker.index,
                "exitcode": exitcode,
                "lost_requests": len(batch.jobs) if batch else 0,
            },
        )
        self.metrics.worker_restarts.labels(self.settings.model).inc()
        worker.failures = 0 if was_ready else worker.failures + 1
        self._keep(asyncio.ensure_future(self._restart(worker)))

    async def _restart(self, worker: Worker) -> None:
        # No wait after a crash in service; a growing one while the model keeps failing to load.
        delay = min(30.0, 0.5 * (2**worker.failures - 1))
        await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(worker)

    def _keep(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
