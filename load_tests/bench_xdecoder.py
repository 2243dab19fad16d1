"""X-Decoder Focal-T speed on this CPU: seconds per image for segmentation at 512 px and for one caption.

    python load_tests/bench_xdecoder.py [--threads N] [--repeats R] [--config xdecoder-focalt]

Uses the deterministic reference checkpoint (made into .cache/ on first use; weights do not change
the cost). Segmentation is the whole `Predictor.segment` call (preprocess to the official 800-px
short side, model, postprocess) on a 512x512 image, with the vocabulary embedded beforehand; the
caption is `Predictor.caption` (50 greedy steps, early stop never triggers with random weights).
Prints a table and writes JSON to load_tests/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import reference_checkpoint
from models.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {"xdecoder-focalt": "xdecoder_focalt", "xdecoder-focall": "xdecoder_focall"}


def reference_root() -> Path:
    for candidate in (ROOT.parent / "shared" / "reference", Path("/work/shared/reference")):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("reference data folder not found (needs <name>/keys.json)")


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="xdecoder-focalt", choices=sorted(REFERENCE))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    keys = reference_root() / REFERENCE[args.config] / "keys.json"
    checkpoint = reference_checkpoint(keys, ROOT / ".cache" / "tests")
    predictor = Predictor.from_config(args.config, checkpoint=checkpoint)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    vocab = predictor.encode_texts(["person", "rocket", "flag", "sky", "wall"])

    rows = {}
    predictor.segment([image], [vocab], "panoptic")  # warm-up
    rows["segment (panoptic, 512 px in, 800 px net)"] = timed(
        lambda: predictor.segment([image], [vocab], "panoptic"), args.repeats
    )
    predictor.caption([image])  # warm-up
    rows["caption (50 greedy steps, 224 px)"] = timed(lambda: predictor.caption([image]), args.repeats)

    print(f"{args.config}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'task':45s} {'median s/image':>15s} {'min':>8s} {'max':>8s}")
    for name, times in rows.items():
        print(f"{name:45s} {statistics.median(times):15.2f} {min(times):8.2f} {max(times):8.2f}")

    out = ROOT / "load_tests" / "results" / f"bench_xdecoder_{args.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": args.config,
        "threads": args.threads,
        "torch": torch.__version__,
        "seconds_per_image": {name: times for name, times in rows.items()},
        "median_seconds_per_image": {name: statistics.median(times) for name, times in rows.items()},
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
