"""The gateway's serving logic, free of HTTP: validate, look up text embeddings, queue, await results.

`Gateway` owns the worker pool, the batcher and the text cache. Each task method takes validated
fields plus the raw image bytes and returns the response body; failures raise `ApiError`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from service.batcher import Batcher, deadline_exceeded
from service.cache import TextEmbeddingCache, normalise_text
from service.errors import ApiError, bad_request
from service.images import inspect_image, size_bucket
from service.metrics import Metrics
from service.pool import Job, WorkerPool
from service.schemas import (
    CaptionFields,
    DetectFields,
    EmbedFields,
    ReferFields,
    RetrieveFields,
    SegmentFields,
)
from service.settings import Settings


@dataclass
class Call:
    """One request's identity and clock: id, deadline (loop time) and the timings it collects (ms)."""

    request_id: str
    deadline: float
    started: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None
    task: str | None = None

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


class Gateway:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.batcher = Batcher(settings, metrics)
        self.pool = WorkerPool(settings, metrics, on_idle=self.batcher.wake)
        self.cache = TextEmbeddingCache(settings.text_cache_size, settings.redis_url, metrics)
        self.draining = False
        self.started = False
        self._closed_vocabulary: tuple[str | None, frozenset[str]] = (None, frozenset())

    async def start(self) -> None:
        self.batcher.start(self.pool)
        await self.pool.start()
        self.started = True

    async def stop(self) -> None:
        self.draining = True
        await self.batcher.stop()
        await self.pool.stop()
        await self.cache.close()

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.pool.ready_count > 0

    # -- common steps ------------------------------------------------------------------------------

    def begin(self, request_id: str, timeout: float | None, started: float | None = None) -> Call:
        """Check readiness and give the request its deadline (the smaller of server and request timeouts)."""
        if not self.ready:
            reason = "shutting down" if self.draining else "workers are still loading"
            raise ApiError(
                503, "not_ready", f"The service is not ready ({reason}); retry shortly.", {"Retry-After": "1"}
            )
        seconds = min(timeout or self.settings.request_timeout_s, self.settings.request_timeout_s)
        call = Call(request_id, asyncio.get_running_loop().time() + seconds)
        if started is not None:
            call.started = started  # perf_counter time the request arrived
        return call

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model:
            raise bad_request(
                "unknown_model", f"Model {model!r} is not loaded; this server runs {self.settings.model!r}."
            )

    def check_text(self, text: str, what: str) -> str:
        cleaned = text.strip()
        if not cleaned:
            raise bad_request(f"invalid_{what}", f"An empty {what} was given.")
        if len(cleaned) > self.settings.max_text_length:
            raise bad_request(
                f"{what}_too_long",
                f"A {what} has {len(cleaned)} characters; the limit is {self.settings.max_text_length}.",
            )
        return cleaned

    def check_count(self, count: int, what: str) -> None:
        if count > self.settings.max_retrieve_items:
            raise bad_request(
                "too_many_items",
                f"{count} {what} were sent; the limit is {self.settings.max_retrieve_items}.",
            )

    def image_bucket(self, data: bytes) -> tuple[str, tuple[int, int]]:
        width, height = inspect_image(data, self.settings.max_image_pixels)
        return size_bucket(width, height), (width, height)

    async def run_job(
        self, call: Call, task: str, label: str, bucket: str, item: dict, options: dict | None = None
    ) -> dict:
        """Queue one job and wait for its worker result (504 at the deadline, whatever the job's state)."""
        loop = asyncio.get_running_loop()
        job = Job(
            task, label, options or {}, bucket, item, call.deadline, call.request_id, loop.create_future()
        )
        self.batcher.submit(job)
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), max(0.0, call.remaining()))
        except TimeoutError:
            job.future.cancel()  # the batcher drops it if still queued
            raise deadline_exceeded() from None
        call.timings_ms["queue"] = round((job.dispatched - job.enqueued) * 1e3, 3)
        call.timings_ms.update(result["timings_ms"])
        call.batch_size = result["batch_size"]
        call.task = label
        return result["body"]

    def finish(self, call: Call, body: dict) -> dict:
        call.timings_ms["total"] = round((time.perf_counter() - call.started) * 1e3, 3)
        return {"model": self.settings.model, **body, "timings_ms": call.timings_ms}

    async def text_embeddings(self, call: Call, texts: list[str]) -> np.ndarray:
        """(N, D) class embeddings from the cache; misses are computed by the workers in one job."""
        start = time.perf_counter()
        model_id = self.pool.model_id or self.settings.model

        async def compute(missing: list[str]) -> np.ndarray:
            body = await self.run_job(call, "encode_text", "encode_text", "text", {"texts": missing})
            return body["embeddings"]

        try:
            embeddings = await asyncio.wait_for(
                self.cache.embeddings(model_id, texts, compute), max(0.0, call.remaining())
            )
        except TimeoutError:
            raise deadline_exceeded() from None
        call.timings_ms.pop("queue", None)
        call.timings_ms = {"text": round((time.perf_counter() - start) * 1e3, 3)}
        return embeddings

    # -- tasks -------------------------------------------------------------------------------------

    def check_task(self, task: str) -> None:
        """400 when the loaded model does not serve `task` (e.g. captioning on a segmentation-only model)."""
        tasks = self.pool.info.get("tasks")
        if tasks is not None and task not in tasks:
            raise bad_request(
                "unsupported_task",
                f"Model {self.settings.model!r} does not serve {task!r}; it serves: {', '.join(tasks)}.",
            )

    def check_vocabulary(self, vocabulary: list[str]) -> tuple[list[str], list[str]]:
        """(labels as sent, stripped; their normalised forms) of a valid vocabulary, else 400.

        A closed-set model (its `label_set`) accepts only names of its label set."""
        if not vocabulary:
            raise bad_request("invalid_vocabulary", "The vocabulary is empty; send at least one class name.")
        if len(vocabulary) > self.settings.max_vocabulary:
            raise bad_request(
                "invalid_vocabulary",
                f"{len(vocabulary)} class names sent; the limit is {self.settings.max_vocabulary}.",
            )
        labels = [self.check_text(name, "class_name") for name in vocabulary]
        normalised = [normalise_text(name) for name in labels]
        known = self.closed_vocabulary()
        if known is not None:
            unknown = [label for label, name in zip(labels, normalised, strict=True) if name not in known]
            if unknown:
                raise bad_request(
                    "unknown_class",
                    f"Model {self.settings.model!r} has a closed vocabulary; not in its label set: "
                    f"{unknown}. Valid names: {', '.join(self.pool.info['label_set'])}.",
                )
        return labels, normalised

    def closed_vocabulary(self) -> frozenset[str] | None:
        """The normalised names a closed-vocabulary model accepts (its label set and aliases), built
        once per loaded model; None for an open vocabulary."""
        info = self.pool.info
        if not info.get("label_set"):
            return None
        if self._closed_vocabulary[0] != self.pool.model_id:
            accepted = info.get("label_names_accepted") or info["label_set"]
            self._closed_vocabulary = (self.pool.model_id, frozenset(normalise_text(n) for n in accepted))
        return self._closed_vocabulary[1]

    async def segment(self, call: Call, fields: SegmentFields, image: bytes) -> dict:
        self.check_model(fields.model)
        self.check_task(fields.task)
        labels, normalised = self.check_vocabulary(fields.vocabulary)
        stuff = {normalise_text(name) for name in fields.stuff}
        unknown = stuff - set(normalised)
        if unknown:
            raise bad_request("invalid_stuff", f"Stuff names not in the vocabulary: {sorted(unknown)}.")
        bucket, _ = self.image_bucket(image)
        embeddings = await self.text_embeddings(call, normalised)
        item = {
            "image": image,
            "embeddings": embeddings,
            "labels": labels,
            # None: the model's default (open vocabulary: all things; closed: its label set's split)
            "thing_flags": [name not in stuff for name in normalised] if stuff else None,
            "threshold": fields.threshold,
            "mask_format": fields.mask_format,
        }
        options = {"segment_task": fields.task}
        body = await self.run_job(call, "segment", fields.task, bucket, item, options)
        return self.finish(call, body)

    async def detect(self, call: Call, fields: DetectFields, image: bytes) -> dict:
        self.check_model(fields.model)
        self.check_task("detect")
        labels, normalised = self.check_vocabulary(fields.vocabulary)
        bucket, _ = self.image_bucket(image)
        embeddings = await self.text_embeddings(call, normalised)
        item = {
            "image": image,
            "embeddings": embeddings,
            "labels": labels,
            "threshold": fields.threshold,
            "max_detections": fields.max_detections,
        }
        return self.finish(call, await self.run_job(call, "detect", "detect", bucket, item))

    async def refer(self, call: Call, fields: ReferFields, image: bytes) -> dict:
        self.check_model(fields.model)
        self.check_task("refer")
        phrase = self.check_text(fields.phrase, "phrase")
        bucket, _ = self.image_bucket(image)
        item = {
            "image": image,
            "phrase": phrase,
            "multi": fields.multi,
            "threshold": fields.threshold,
            "mask_format": fields.mask_format,
        }
        return self.finish(call, await self.run_job(call, "refer", "refer", bucket, item))

    async def caption(self, call: Call, fields: CaptionFields, image: bytes) -> dict:
        self.check_model(fields.model)
        self.check_task("caption")
        if fields.beams > 1 and self.settings.runtime != "torch":
            raise bad_request(
                "invalid_request",
                f"Beam search (beams={fields.beams}) runs on the torch runtime only; this server runs "
                f"{self.settings.runtime!r}. Send beams=1.",
            )
        bucket, _ = self.image_bucket(image)
        item = {"image": image, "beams": fields.beams}
        return self.finish(call, await self.run_job(call, "caption", "caption", bucket, item))

    async def retrieve(self, call: Call, fields: RetrieveFields, images: list[bytes]) -> dict:
        self.check_model(fields.model)
        self.check_task("retrieve")
        if not images or not fields.texts:
            raise bad_request("invalid_request", "Send at least one image and one text.")
        self.check_count(len(images), "images")
        self.check_count(len(fields.texts), "texts")
        texts = [self.check_text(text, "text") for text in fields.texts]
        for data in images:
            self.image_bucket(data)
        item = {"images": images, "texts": texts}
        return self.finish(call, await self.run_job(call, "retrieve", "retrieve", "any", item))

    async def embed(self, call: Call, fields: EmbedFields, images: list[bytes]) -> dict:
        self.check_model(fields.model)
        self.check_task("embed")
        if bool(images) == bool(fields.texts):
            raise bad_request("invalid_request", "Send either texts or images (one of them, not both).")
        if images:
            self.check_count(len(images), "images")
            for data in images:
                self.image_bucket(data)
            body = await self.run_job(call, "embed_image", "embed_image", "any", {"images": images})
        else:
            self.check_count(len(fields.texts), "texts")
            texts = [self.check_text(text, "text") for text in fields.texts]
            body = await self.run_job(call, "embed_text", "embed_text", "text", {"texts": texts})
        return self.finish(call, body)

    def models(self) -> dict:
        info = self.pool.info
        return {
            "models": [
                {
                    "name": self.settings.model,
                    "model_id": self.pool.model_id,
                    "tasks": list(info.get("tasks", ["segment", "refer", "caption", "retrieve", "embed"])),
                    "runtime": str(info.get("runtime", self.settings.runtime)),
                    "device": str(info.get("device", self.settings.device)),
                    "info": info,
                    "workers": len(self.pool.workers),
                }
            ]
        }
