"""Gateway benchmark on the demo model, in one run on this machine.

Measures, with real servers (worker processes) started here:
  1. throughput and p50/p99 latency of /v1/segment at concurrency 1, 8 and 32, batching on
     (MAX_BATCH_SIZE=8) vs off (MAX_BATCH_SIZE=1);
  2. /v1/segment latency with a 150-class vocabulary, cold vs warm text-embedding cache;
  3. gateway overhead: end-to-end latency minus the worker's compute (timings_ms.worker) at concurrency 1.
Prints a table and writes JSON to load_tests/results/. Targets: batching >= 1.5x throughput at
concurrency 32; warm cache >= 5x faster than cold; gateway overhead < 5 ms at p50.

    .venv/bin/python load_tests/bench_service.py [--seconds 8] [--workers 1] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
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


async def closed_loop(url: str, body: dict, concurrency: int, seconds: float) -> dict:
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
                response = await client.post("/v1/segment", json=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    errors += 1
                    continue
                latencies.append(elapsed * 1e3)
                worker_ms.append(response.json()["timings_ms"]["worker"])

        started = time.perf_counter()
        await asyncio.gather(*(run_client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    overhead = [total - worker for total, worker in zip(latencies, worker_ms, strict=True)]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "overhead_p50_ms": percentile(overhead, 50),
        "overhead_p99_ms": percentile(overhead, 99),
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
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each concurrency level")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="MAX_BATCH_SIZE with batching on")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="MAX_BATCH_DELAY_MS")
    parser.add_argument("--cache-runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()

    image = base64.b64encode(image_bytes(args.size, args.size)).decode()
    body = {"image": image, "vocabulary": ["dark", "mid", "bright"]}
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
        "throughput": {},
    }
    log_dir = Path(tempfile.mkdtemp(prefix="openset-bench-"))
    for name, batch_size in (("batching", args.batch_size), ("batch_size_1", 1)):
        server = start_server(log_dir, max_batch_size=batch_size, **common)
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for _ in range(5):  # warm the text cache and the worker
                    timed_post(client, body)
            levels = [asyncio.run(closed_loop(server.url, body, c, args.seconds)) for c in (1, 8, 32)]
            results["throughput"][name] = {"max_batch_size": batch_size, "levels": levels}
            if name == "batching":
                results["cache"] = bench_cache(server.url, image, args.cache_runs)
                results["overhead_c1"] = {k: levels[0][k] for k in ("overhead_p50_ms", "overhead_p99_ms")}
        finally:
            server.stop()

    on, off = (results["throughput"][name]["levels"] for name in ("batching", "batch_size_1"))
    results["ratios"] = {
        f"throughput_c{a['concurrency']}": a["throughput_rps"] / b["throughput_rps"]
        for a, b in zip(on, off, strict=True)
    }
    results["targets"] = {
        "batching_c32_at_least_1.5x": results["ratios"]["throughput_c32"] >= 1.5,
        "warm_cache_at_least_5x": results["cache"]["speedup"] >= 5,
        "gateway_overhead_p50_under_5ms": results["overhead_c1"]["overhead_p50_ms"] < 5,
    }
    print_table(results)
    out_dir = REPO_ROOT / "load_tests" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_service-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")
    return 0


def print_table(results: dict) -> None:
    print(f"\n/v1/segment, 3 classes, {results['settings']['image_size']}px images")
    print(f"{'config':<14}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, run in results["throughput"].items():
        for level in run["levels"]:
            print(
                f"{name:<14}{level['concurrency']:>5}{level['throughput_rps']:>9.1f}"
                f"{level['p50_ms']:>9.1f}{level['p99_ms']:>9.1f}{level['errors']:>8}"
            )
    for key, ratio in results["ratios"].items():
        print(f"batching / batch size 1, {key}: {ratio:.2f}x")
    cache = results["cache"]
    print(
        f"\n150 classes: cold p50 {cache['cold_p50_ms']:.1f} ms, warm p50 {cache['warm_p50_ms']:.1f} ms, "
        f"speedup {cache['speedup']:.1f}x"
    )
    overhead = results["overhead_c1"]
    print(
        f"gateway overhead at concurrency 1: p50 {overhead['overhead_p50_ms']:.2f} ms, "
        f"p99 {overhead['overhead_p99_ms']:.2f} ms"
    )
    print("targets: " + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in results["targets"].items()))


if __name__ == "__main__":
    sys.exit(main())
