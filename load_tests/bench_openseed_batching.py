"""OpenSeeD batching: group requests by vocabulary, or batch them mixed and decode per vocabulary?

OpenSeeD's query selection depends on the vocabulary, so the decoder cannot be shared by requests
with different vocabularies. Two ways to batch N images carrying V distinct vocabularies:

    grouped  one predictor call per vocabulary (what the batcher's vocabulary buckets produce):
             backbone + pixel decoder + decoder on each group's images
    mixed    one predictor call for all N: backbone + pixel decoder once on the whole batch, the
             decoder once per vocabulary on its images (`OpenSeeDPredictor._run`)

Both give the same outputs (checked here); the script times both in one run, alternating, and prints
the ratio per (N, V).

    .venv/bin/python load_tests/bench_openseed_batching.py [--device cuda] [--short 512]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import reference_checkpoint
from models.configs import ResizeRule
from models.predictor_openseed import OpenSeeDPredictor

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY_POOL = ["person", "dog", "cat", "car", "tree", "sky", "grass", "road", "building", "bicycle"]


def reference_keys() -> Path:
    """openseed_swint/keys.json under OPENSET_REFERENCE_DIR, ../shared/reference or /work/shared/reference."""
    folders = [
        os.environ.get("OPENSET_REFERENCE_DIR"),
        ROOT.parent / "shared" / "reference",
        "/work/shared/reference",
    ]
    for folder in [Path(f) for f in folders if f]:
        if (folder / "openseed_swint" / "keys.json").is_file():
            return folder / "openseed_swint" / "keys.json"
    raise FileNotFoundError("openseed_swint/keys.json not found in ../shared/reference")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_grouped(
    predictor: OpenSeeDPredictor, images: list, per_image: list[torch.Tensor], groups: list[list[int]]
) -> list:
    """One `detect` call per vocabulary group; results back in image order."""
    out: list = [None] * len(images)
    for members in groups:
        result = predictor.detect([images[i] for i in members], [per_image[i] for i in members])
        for i, r in zip(members, result, strict=True):
            out[i] = r
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="openseed-swint", help="openseed-tiny: seeded miniature")
    parser.add_argument("--short", type=int, default=384, help="network input short side")
    parser.add_argument("--cases", default="8x1,8x2,8x4,8x8", help="images x distinct vocabularies")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    checkpoint = (
        None
        if args.config == "openseed-tiny"
        else reference_checkpoint(reference_keys(), ROOT / ".cache" / "tests")
    )
    predictor = OpenSeeDPredictor.from_config(args.config, checkpoint=checkpoint, device=args.device)
    predictor.model.cfg.resize = ResizeRule(short=args.short, max_size=args.short * 2)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    print(f"{args.config} on {args.device}, input {args.short}x{args.short}, torch {torch.__version__}")
    print(
        f"{'images':>6} {'vocabs':>6} {'grouped s':>10} {'mixed s':>10} {'grouped/mixed':>14}  max score diff"
    )
    for case in args.cases.split(","):
        n, v = (int(x) for x in case.split("x"))
        images = [rng.integers(0, 256, (args.short, args.short, 3), dtype=np.uint8) for _ in range(n)]
        pool = VOCABULARY_POOL
        vocabularies = [
            predictor.encode_texts([pool[k % 10], pool[(k + 1) % 10], f"thing {k}"]) for k in range(v)
        ]
        per_image = [vocabularies[i % v] for i in range(n)]
        groups = [[i for i in range(n) if i % v == k] for k in range(v)]

        runs = {
            "grouped": functools.partial(run_grouped, predictor, images, per_image, groups),
            "mixed": functools.partial(predictor.detect, images, per_image),
        }
        times: dict[str, list[float]] = {"grouped": [], "mixed": []}
        results = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fn in runs.items():
                synchronize(device)
                start = time.perf_counter()
                results[name] = fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
        g, m = statistics.median(times["grouped"][1:]), statistics.median(times["mixed"][1:])
        # Same detections up to float noise (cuDNN's TF32 convolutions vary with the batch size on GPU).
        diff = max(
            abs(x.score - y.score)
            for a, b in zip(results["grouped"], results["mixed"], strict=True)
            for x, y in zip(a.detections, b.detections, strict=True)
        )
        print(f"{n:>6} {v:>6} {g:>10.3f} {m:>10.3f} {g / m:>13.2f}x  {diff:.1e}")


if __name__ == "__main__":
    main()
