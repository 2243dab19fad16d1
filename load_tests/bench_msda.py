"""Multi-scale deformable attention benchmark: the grid_sample reference vs the C++ CPU kernel, and
on a CUDA device the reference vs the Triton kernel, measured in one run on this machine.

Shapes are OpenSeeD's: 4 levels 100x152, 50x76, 25x38, 13x19 (an 800x1216 input), 8 heads,
head dim 32 (d 256), 4 points; encoder (one query per position, 20197 queries) and decoder (300
queries), batch 1 and 4. Sampling locations are drawn two ways: "local" (each query's reference
point plus offsets of about 2 pixels, as a trained model samples) and "uniform" (anywhere in the
maps, as in the golden cases: no cache locality, the slowest case for the kernels). Each timing
is the best of `--repeats` runs after one warm-up run; every fast kernel's output is also
compared with the reference. Prints a table of speed-ups and writes
JSON to load_tests/results/bench_msda.json. Targets: C++ >= 3x the reference on the encoder shape
(CPU), Triton >= 5x the reference (GPU).

    .venv/bin/python load_tests/bench_msda.py [--threads 2] [--repeats 3] [--device cpu|cuda|all]
        [--locations local,uniform]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from models.ops import (  # noqa: E402
    cpu_kernel_available,
    ms_deform_attn_cpu,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
    triton_available,
)
from models.ops.synthetic import make_inputs  # noqa: E402

OPENSEED_LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]
CPU_TARGET = 3.0
GPU_TARGET = 5.0
RESULTS = REPO_ROOT / "load_tests" / "results" / "bench_msda.json"


def best_time(function: Callable[[], torch.Tensor], repeats: int, cuda: bool) -> tuple[float, torch.Tensor]:
    """Best wall time in seconds over `repeats` runs after one warm-up run, and the last output."""
    output = function()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = function()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, output


LOCATIONS = {"local": 2.0, "uniform": None}  # name -> offset spread in pixels (None: uniform)


def shapes_to_run() -> list[tuple[str, int, int | None]]:
    """(name, batch, queries); queries None = encoder (all positions)."""
    kinds = (("encoder", None), ("decoder", 300))
    return [(f"{kind} b{batch}", batch, queries) for kind, queries in kinds for batch in (1, 4)]


def bench_device(device: str, repeats: int, locations: list[str]) -> list[dict[str, object]]:
    """One row per shape and location kind: both times, the speed-up, the max abs difference."""
    cuda = device == "cuda"
    fast_name = "triton" if cuda else "cpp"
    fast_kernel = ms_deform_attn_triton if cuda else ms_deform_attn_cpu
    rows = []
    for name, batch, queries in shapes_to_run():
        for kind in locations:
            rows.append(bench_one(device, name, batch, queries, kind, fast_name, fast_kernel, repeats))
    return rows


def bench_one(
    device: str,
    name: str,
    batch: int,
    queries: int | None,
    kind: str,
    fast_name: str,
    fast_kernel: Callable[..., torch.Tensor],
    repeats: int,
) -> dict[str, object]:
    cuda = device == "cuda"
    drawn = make_inputs(OPENSEED_LEVELS, batch, queries, seed=batch, spread_pixels=LOCATIONS[kind])
    inputs = [t.to(device) for t in drawn]
    reference_s, expected = best_time(lambda: ms_deform_attn_reference(*inputs), repeats, cuda)
    fast_s, output = best_time(lambda: fast_kernel(*inputs), repeats, cuda)
    return {
        "device": device,
        "shape": name,
        "locations": kind,
        "queries": int(inputs[3].shape[1]),
        "reference_ms": 1e3 * reference_s,
        f"{fast_name}_ms": 1e3 * fast_s,
        "kernel": fast_name,
        "speedup": reference_s / fast_s,
        "max_abs_diff": float((output.float() - expected.float()).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="multi-scale deformable attention kernels vs the reference")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both CPU kernels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--locations", default="local,uniform", help="comma-separated: local, uniform")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    locations = [kind for kind in args.locations.split(",") if kind]
    if any(kind not in LOCATIONS for kind in locations):
        parser.error(f"--locations takes {', '.join(LOCATIONS)}")

    rows: list[dict[str, object]] = []
    skipped: list[str] = []
    if args.device in ("cpu", "all"):
        if cpu_kernel_available():
            rows += bench_device("cpu", args.repeats, locations)
        else:
            skipped.append("cpu: the C++ kernel could not be built")
    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            skipped.append("cuda: no CUDA device")
        elif not triton_available():
            skipped.append("cuda: Triton is not installed")
        else:
            rows += bench_device("cuda", args.repeats, locations)

    print(f"threads={torch.get_num_threads()} repeats={args.repeats} torch={torch.__version__}")
    print(
        f"{'device':<6} {'shape':<12} {'locations':<9} {'queries':>7} {'reference ms':>13} {'kernel':>7} "
        f"{'kernel ms':>10} {'speed-up':>9} {'max diff':>9}"
    )
    failures = []
    for row in rows:
        kernel_ms = row[f"{row['kernel']}_ms"]
        print(
            f"{row['device']:<6} {row['shape']:<12} {row['locations']:<9} {row['queries']:>7} "
            f"{row['reference_ms']:>13.1f} {row['kernel']:>7} {kernel_ms:>10.1f} {row['speedup']:>8.1f}x "
            f"{row['max_abs_diff']:>9.1e}"
        )
        target = GPU_TARGET if row["device"] == "cuda" else CPU_TARGET
        if str(row["shape"]).startswith("encoder") and row["speedup"] < target:
            failures.append(
                f"{row['device']} {row['shape']} {row['locations']}: {row['speedup']:.1f}x < {target}x"
            )
        if row["max_abs_diff"] > 1e-4:
            failures.append(f"{row['device']} {row['shape']} {row['locations']}: differs from the reference")
    for note in skipped:
        print(f"skipped {note}")
    report = {
        "benchmark": "ms_deform_attn",
        "levels": OPENSEED_LEVELS,
        "heads": 8,
        "head_dim": 32,
        "points": 4,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "locations": {kind: LOCATIONS[kind] for kind in locations},
        "rows": rows,
        "skipped": skipped,
        "targets": {"cpu_encoder_speedup": CPU_TARGET, "cuda_encoder_speedup": GPU_TARGET},
        "failures": failures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    for failure in failures:
        print(f"target missed: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
