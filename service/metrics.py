"""Prometheus metrics of DESIGN.md (names, types and labels exactly as in its table).

One `Metrics` object per app owns its registry, so several apps in one process never clash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    """The service's metrics. `text_cache_requests_total` counts one lookup per text and tier."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "openset_requests_total", "HTTP requests answered.", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "openset_request_duration_seconds",
            "End-to-end request latency in the gateway.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "openset_queue_wait_seconds",
            "Time from enqueue to dispatch to a worker.",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "openset_inference_duration_seconds",
            "Worker compute time of one batch (decode, model, postprocess, encoding).",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "openset_batch_size",
            "Requests per dispatched batch.",
            ["model", "task"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "openset_queue_depth", "Requests waiting in the batcher.", ["model", "task"], registry=r
        )
        self.rejected = Counter(
            "openset_rejected_total", "Requests refused, by reason.", ["reason"], registry=r
        )
        self.text_cache = Counter(
            "openset_text_cache_requests_total",
            "Text-embedding cache lookups, one per text and tier.",
            ["tier", "result"],
            registry=r,
        )
        self.workers_alive = Gauge(
            "openset_workers_alive", "Worker processes loaded and serving.", ["model"], registry=r
        )
        self.worker_restarts = Counter(
            "openset_worker_restarts_total", "Worker processes restarted after dying.", ["model"], registry=r
        )
