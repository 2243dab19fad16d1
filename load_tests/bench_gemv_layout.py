"""Why `XDecoderModel.lay_out_caption_step_weights` stores each matrix contiguous along its longer side.

    python load_tests/bench_gemv_layout.py [--threads 1] [--repeats 7] [--megabytes 256]

A greedy caption step multiplies one row per image by every matrix of the text encoder and the
decoder, so on a CPU its time is the time to stream those weights from memory. This script times
`F.linear` on one row, (1, in) x (out, in)^T, for the matrix shapes of an X-Decoder Focal-T step,
with the weight stored row-major (strides (in, 1), PyTorch's default) and column-major (strides
(1, out), same values). Each shape gets enough distinct copies to exceed `--megabytes`, far more
than the last-level cache, so every product reads its weight from memory as a step does. It also
times the self-attention input projection of a step: three one-row products with the q, k and v
slices of the stacked (3D, D) matrix against one two-row product with the whole matrix (the step
keeps the three: reading the matrix once in one product was not faster).

Prints GB/s per layout (median of `--repeats` passes over the copies) and writes JSON to
load_tests/results/bench_gemv_layout.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from models.xdecoder import column_major

ROOT = Path(__file__).resolve().parents[1]
# (out, in) of the matrices one Focal-T caption step reads, and where they are.
STEP_SHAPES = {
    "output embedding 49408x512": (49408, 512),
    "FFN in / c_fc 2048x512": (2048, 512),
    "stacked q,k,v in_proj 1536x512": (1536, 512),
    "square 512x512 (out_proj, cross q)": (512, 512),
    "FFN out / c_proj 512x2048": (512, 2048),
}


def pass_seconds(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor], repeats: int) -> float:
    """Median time of one pass of `fn` over every weight."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for weight in weights:
            fn(weight)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--megabytes", type=int, default=256, help="weights per shape (beyond the cache)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    rows: dict[str, dict[str, float]] = {}
    for name, (out_features, in_features) in STEP_SHAPES.items():
        copies = max(2, args.megabytes * 2**20 // (out_features * in_features * 4))
        plain = [torch.randn(out_features, in_features, generator=generator) for _ in range(copies)]
        laid_out = [column_major(w) for w in plain]
        x = torch.randn(1, 1, in_features, generator=generator)
        gigabytes = copies * out_features * in_features * 4 / 1e9

        def one_row(w: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            return F.linear(x, w)

        rows[name] = {
            "row-major GB/s": gigabytes / pass_seconds(one_row, plain, args.repeats),
            "column-major GB/s": gigabytes / pass_seconds(one_row, laid_out, args.repeats),
        }

    d = 512
    copies = max(2, args.megabytes * 2**20 // (3 * d * d * 4))
    stacked = [column_major(torch.randn(3 * d, d, generator=generator)) for _ in range(copies)]
    x, values_from = torch.randn(1, 1, d, generator=generator), torch.randn(1, 1, d, generator=generator)
    both = torch.cat((x, values_from))

    def three_slices(w: torch.Tensor) -> None:
        F.linear(x, w[:d])
        F.linear(x, w[d : 2 * d])
        F.linear(values_from, w[2 * d :])

    def two_rows(w: torch.Tensor) -> torch.Tensor:
        return F.linear(both, w)

    fused = {
        "three one-row products, ms": 1e3 * pass_seconds(three_slices, stacked, args.repeats) / copies,
        "one two-row product, ms": 1e3 * pass_seconds(two_rows, stacked, args.repeats) / copies,
    }

    print(f"{args.threads} thread(s), one-row F.linear, weights from memory ({args.megabytes} MB per shape)")
    print(f"{'matrix (out x in)':36s} {'row-major':>10s} {'col-major':>10s} {'col / row':>10s}")
    for name, r in rows.items():
        ratio = r["column-major GB/s"] / r["row-major GB/s"]
        print(f"{name:36s} {r['row-major GB/s']:8.1f} GB/s {r['column-major GB/s']:5.1f} GB/s {ratio:9.2f}x")
    three, two = fused["three one-row products, ms"], fused["one two-row product, ms"]
    print(f"self-attention q, k, v of a step (stacked 1536x512, column-major): three slices {three:.3f} ms,")
    print(f"one two-row product {two:.3f} ms")
    out = ROOT / "load_tests" / "results" / "bench_gemv_layout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"threads": args.threads, "torch": torch.__version__, "layouts": rows} | fused, indent=2)
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
