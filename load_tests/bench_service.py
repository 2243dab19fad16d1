"""Gateway benchmark on the demo model, in one run on this machine.

Measures, with real servers (worker processes) started here:
  1. throughput and p50/p99 latency at concurrency 1, 8 and 32, batching on (MAX_BATCH_SIZE=8) vs
     off (MAX_BATCH_SIZE=1), for /v1/segment (3 classes) and /v1/caption;
  2. /v1/segment latency with a 150-class vocabulary, cold vs warm text-embedding cache;
  3. gateway overhead: end-to-end latency minus the worker's compute (timings_ms.worker) at
     concurrency 1, from a minimal keep-alive client, on both servers (with MAX_BATCH_SIZE=1 no batch
     ever waits, so that number is the gateway alone; the other includes the batching delay).
Prints a table and writes JSON to load_tests/results/. Targets: batching >= 1.5x throughput at
concurrency 32; warm cache >= 5x faster than cold; gateway overhead < 5 ms at p50.

    .venv/bin/python load_tests/bench_service.py [--seconds 6] [--workers 1] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.service_helpers import image_bytes, start_server  # noqa: E402

COLOURS = [
    "red",
    "orange",
    "yellow",
    "green",
    "teal",
    "blue",
    "navy",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "gold",
    "silver",
]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "stripe", "dot", "blob", "hexagon"]
COLD_WORDS = ["small", "large", "striped", "dotted", "shiny", "matte", "faded", "bright", "dark", "tiny"]


def vocabulary_150(extra: str = "") -> list[str]:
    """150 class names (15 colours x 10 shapes); `extra` makes a set no cache has seen."""
    return [" ".join(filter(None, (extra, colour, shape))) for colour in COLOURS for shape in SHAPES]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def closed_loop(url: str, path: str, body: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients sending back to back for `seconds`; throughput and latency percentiles."""
    latencies: list[float] = []
    worker_ms: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        end = time.perf_counter() + seconds

        async def run_client() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                start = time.perf_counter()
                response = await client.post(path, json=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    errors += 1
                    continue
                latencies.append(elapsed * 1e3)
                worker_ms.append(response.json()["timings_ms"]["worker"])

        started = time.perf_counter()
        await asyncio.gather(*(run_client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_overhead(url: str, pid: int, body: dict, requests: int) -> dict:
    """Concurrency 1 from a minimal keep-alive client: end-to-end minus worker compute, per request,
    and the gateway process's CPU time per request (robust to a busy machine's scheduling delays)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    payload = json.dumps(body).encode()
    overhead, server_side, queue = [], [], []
    cpu_start = 0.0
    for index in range(requests + 5):
        if index == 5:
            cpu_start = process_cpu_seconds(pid)
        start = time.perf_counter()
        connection.request("POST", "/v1/segment", payload, {"Content-Type": "application/json"})
        response = json.loads(connection.getresponse().read())
        elapsed = (time.perf_counter() - start) * 1e3
        if index < 5:
            continue  # warm-up
        timings = response["timings_ms"]
        overhead.append(elapsed - timings["worker"])
        server_side.append(timings["total"] - timings["worker"])
        queue.append(timings["queue"])
    cpu_ms = (process_cpu_seconds(pid) - cpu_start) * 1e3 / requests
    connection.close()
    return {
        "requests": requests,
        "gateway_cpu_ms_per_request": cpu_ms,
        "overhead_p50_ms": percentile(overhead, 50),
        "overhead_p99_ms": percentile(overhead, 99),
        "in_server_p50_ms": percentile(server_side, 50),
        "queue_p50_ms": percentile(queue, 50),
    }


def timed_post(client: httpx.Client, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = client.post("/v1/segment", json=body)
    elapsed = (time.perf_counter() - start) * 1e3
    response.raise_for_status()
    return elapsed, response.json()


def bench_cache(url: str, image: str, runs: int) -> dict:
    """150-class /v1/segment: cold (new names each run) vs warm (the same names again)."""
    cold, warm = [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for run in range(runs):
            vocabulary = vocabulary_150(COLD_WORDS[run % len(COLD_WORDS)] + str(run))
            cold.append(timed_post(client, {"image": image, "vocabulary": vocabulary})[0])
            for _ in range(3):
                warm.append(timed_post(client, {"image": image, "vocabulary": vocabulary})[0])
    return {
        "classes": 150,
        "cold_runs": len(cold),
        "warm_runs": len(warm),
        "cold_p50_ms": percentile(cold, 50),
        "warm_p50_ms": percentile(warm, 50),
        "speedup": percentile(cold, 50) / percentile(warm, 50),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="duration of each concurrency level")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="MAX_BATCH_SIZE with batching on")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="MAX_BATCH_DELAY_MS")
    parser.add_argument("--cache-runs", type=int, default=3)
    parser.add_argument("--overhead-requests", type=int, default=100)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()

    image = base64.b64encode(image_bytes(args.size, args.size)).decode()
    workloads = {
        "/v1/segment": {"image": image, "vocabulary": ["dark", "mid", "bright"]},
        "/v1/caption": {"image": image},
    }
    common = {
        "model": args.model,
        "workers": args.workers,
        "torch_threads": args.torch_threads,
        "max_batch_delay_ms": args.delay_ms,
        "queue_size": 256,
        "log_level": "warning",
    }
    results: dict = {
        "settings": {**common, "image_size": args.size, "seconds": args.seconds},
        "load_average_at_start": os.getloadavg(),  # the machine is shared: read ratios, not absolutes
        "throughput": {path: {} for path in workloads},
        "overhead_c1": {},
    }
    log_dir = Path(tempfile.mkdtemp(prefix="openset-bench-"))
    for name, batch_size in (("batching", args.batch_size), ("batch_size_1", 1)):
        server = start_server(log_dir, max_batch_size=batch_size, **common)
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for path, body in workloads.items():  # warm the text cache and the worker
                    for _ in range(3):
                        client.post(path, json=body).raise_for_status()
            for path, body in workloads.items():
                levels = [
                    asyncio.run(closed_loop(server.url, path, body, c, args.seconds)) for c in (1, 8, 32)
                ]
                results["throughput"][path][name] = levels
            results["overhead_c1"][name] = gateway_overhead(
                server.url, server.process.pid, workloads["/v1/segment"], args.overhead_requests
            )
            if name == "batching":
                results["cache"] = bench_cache(server.url, image, args.cache_runs)
        finally:
            server.stop()

    results["ratios"] = {
        path: {
            f"c{on['concurrency']}": on["throughput_rps"] / off["throughput_rps"]
            for on, off in zip(runs["batching"], runs["batch_size_1"], strict=True)
        }
        for path, runs in results["throughput"].items()
    }
    results["targets"] = {
        **{
            f"batching_c32_at_least_1.5x {path}": ratios["c32"] >= 1.5
            for path, ratios in results["ratios"].items()
        },
        "warm_cache_at_least_5x": results["cache"]["speedup"] >= 5,
        "gateway_overhead_p50_under_5ms": results["overhead_c1"]["batch_size_1"]["overhead_p50_ms"] < 5,
    }
    results["load_average_at_end"] = os.getloadavg()
    print_table(results)
    out_dir = REPO_ROOT / "load_tests" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_service-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")
    return 0


def print_table(results: dict) -> None:
    print(f"\n{results['settings']['image_size']}px images, {results['settings']['workers']} worker(s)")
    print(f"{'endpoint':<13}{'config':<14}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for path, runs in results["throughput"].items():
        for name, levels in runs.items():
            for level in levels:
                print(
                    f"{path:<13}{name:<14}{level['concurrency']:>5}{level['throughput_rps']:>9.2f}"
                    f"{level['p50_ms']:>9.1f}{level['p99_ms']:>9.1f}{level['errors']:>8}"
                )
    for path, ratios in results["ratios"].items():
        text = ", ".join(f"{key} {ratio:.2f}x" for key, ratio in ratios.items())
        print(f"throughput batching / batch size 1, {path}: {text}")
    cache = results["cache"]
    print(
        f"\n150 classes: cold p50 {cache['cold_p50_ms']:.1f} ms, warm p50 {cache['warm_p50_ms']:.1f} ms, "
        f"speedup {cache['speedup']:.1f}x"
    )
    for name, overhead in results["overhead_c1"].items():
        print(
            f"gateway overhead at concurrency 1 ({name}): p50 {overhead['overhead_p50_ms']:.2f} ms, "
            f"p99 {overhead['overhead_p99_ms']:.2f} ms (in server {overhead['in_server_p50_ms']:.2f} ms, "
            f"of which queue {overhead['queue_p50_ms']:.2f} ms); gateway CPU "
            f"{overhead['gateway_cpu_ms_per_request']:.2f} ms per request"
        )
    start, end = results["load_average_at_start"][0], results["load_average_at_end"][0]
    print(f"load average (1 min) at start {start:.1f}, at end {end:.1f}")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in results["targets"].items()))


if __name__ == "__main__":
    sys.exit(main())
