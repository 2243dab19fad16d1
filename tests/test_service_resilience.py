"""Overload, deadlines, a worker killed mid-load, and graceful shutdown, on a real server with one worker,
batches of one and queues of two."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import threading
import time

import httpx
import pytest

from tests.service_helpers import image_bytes, metric, start_server, worker_pids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = start_server(
        tmp_path_factory.mktemp("resilience"),
        workers=1,
        max_batch_size=1,
        max_batch_delay_ms=0,
        queue_size=2,
        request_timeout_s=60,
    )
    yield process
    process.stop()


def caption_body(size: int = 96) -> dict:
    return {"image": base64.b64encode(image_bytes(size, size)).decode()}


def segment_body(size: int = 96) -> dict:
    return {**caption_body(size), "vocabulary": ["dark", "mid", "bright"]}


def test_overload_answers_429_with_retry_after(server):
    assert httpx.post(f"{server.url}/v1/segment", json=segment_body(), timeout=60).status_code == 200
    before = metric(server.metrics(), "openset_rejected_total", reason="queue_full")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/segment", json=segment_body()) for _ in range(30)))

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    rejected = [response for response in responses if response.status_code == 429]
    assert rejected and statuses.count(200) >= 1, statuses
    assert all(int(response.headers["retry-after"]) >= 1 for response in rejected)
    assert {response.json()["error"]["code"] for response in rejected} == {"queue_full"}
    after = metric(server.metrics(), "openset_rejected_total", reason="queue_full")
    assert after - before == len(rejected)
    assert httpx.post(f"{server.url}/v1/segment", json=segment_body(), timeout=60).status_code == 200


def test_expired_request_is_answered_504_without_compute(server):
    before = server.metrics()
    response = httpx.post(
        f"{server.url}/v1/caption", json=caption_body(), headers={"X-Request-Timeout": "0.0001"}, timeout=60
    )
    assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
    field = httpx.post(f"{server.url}/v1/caption", json={**caption_body(), "timeout": 0.0001}, timeout=60)
    assert field.status_code == 504
    time.sleep(0.2)
    after = server.metrics()
    assert (
        metric(after, "openset_rejected_total", reason="deadline")
        - metric(before, "openset_rejected_total", reason="deadline")
        == 2
    )
    computed = metric(after, "openset_batch_size_count", task="caption") - metric(
        before, "openset_batch_size_count", task="caption"
    )
    assert computed == 0  # dropped before any worker saw them


def test_worker_killed_mid_load_fails_its_requests_503_and_recovers(server):
    (pid,) = worker_pids(server.process.pid)
    statuses: list[tuple[int, str]] = []
    stop = threading.Event()
    body = {
        "image": base64.b64encode(image_bytes(200, 200)).decode(),
        "vocabulary": ["dark", "mid", "bright"],
    }

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=90) as client:
            while not stop.is_set():
                response = client.post("/v1/segment", json={**body, "mask_format": "polygon"})
                code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
                statuses.append((response.status_code, code))
                if response.status_code != 200:
                    time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(statuses) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # kill once requests flow (the worker is then almost always mid-batch)
    before_kill = len(statuses)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a request hung after the worker died"
    assert before_kill > 0 and (200, "") in statuses[:before_kill]
    assert (503, "worker_died") in statuses, statuses
    # Queued requests wait for the replacement worker (or their deadline); new ones meet 503 until it is up.
    assert {status for status, _ in statuses} <= {200, 429, 503, 504}, statuses
    server.wait_ready(120)
    (new_pid,) = worker_pids(server.process.pid)
    assert new_pid != pid
    assert metric(server.metrics(), "openset_worker_restarts_total") == 1
    assert metric(server.metrics(), "openset_workers_alive") == 1
    response = httpx.post(f"{server.url}/v1/segment", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_sigterm_finishes_in_flight_work_then_exits(server):
    """Runs last: stops the module's server."""
    # A cold 64-class vocabulary: its text embeddings keep the worker busy well past the signal.
    body = {
        "image": base64.b64encode(image_bytes()).decode(),
        "vocabulary": [f"late class {i}" for i in range(64)],
    }
    result: dict[str, object] = {}

    def call() -> None:
        result["response"] = httpx.post(f"{server.url}/v1/segment", json=body, timeout=60)
        result["finished"] = time.monotonic()

    misses = metric(server.metrics(), "openset_text_cache_requests_total", tier="memory", result="miss")
    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # signal once the gateway holds the request
        now = metric(server.metrics(), "openset_text_cache_requests_total", tier="memory", result="miss")
        if now >= misses + 64:
            break
        time.sleep(0.01)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    thread.join(60)
    assert result["response"].status_code == 200, result["response"].text
    assert result["finished"] > signalled  # it was in flight when the signal came
    assert server.process.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)
