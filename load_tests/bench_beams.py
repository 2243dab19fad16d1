"""Caption beams on the demo model: time per image and caption mention F1, greedy against beam search.

    python load_tests/bench_beams.py [--images 100] [--seed 11] [--beams 1,4,8,16] [--weights PATH]

Renders `--images` ShapesWorld scenes (held-out combinations allowed, as `openset eval-demo` does),
captions them one image at a time with each beam count (1 is greedy, the default decoding) and scores
the captions as `eval-demo` does. Seed 11 is the one the rank weight (`CAPTION_RANK_WEIGHT`) was chosen
on; the evaluation seeds of the model card are 2026 and 7. Time is process CPU time per image on one
thread (the machine is shared, so CPU time is steadier than wall time), the ratio against greedy is in
the table. Writes JSON to load_tests/results/bench_beams_seed<seed>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from models.demo.evaluate import caption_counts, f1_of_counts, render_scenes
from models.predictor import Predictor

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--beams", default="1,4,8,16")
    parser.add_argument("--weights", type=Path, default=None, help="demo weights (default: the shipped ones)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor.from_config("demo", checkpoint=args.weights)
    scenes = render_scenes(np.random.default_rng(args.seed), args.images)
    predictor.caption([scenes[0].image])  # warm-up
    rows = []
    beam_counts = sorted({1, *(int(b) for b in args.beams.split(","))})  # greedy first: the ratios' base
    for beams in beam_counts:
        counts, seconds = np.zeros((2, 3)), 0.0  # rows: thing mentions, stuff names
        for scene in scenes:
            start = time.process_time()
            caption = predictor.caption([scene.image], beams=beams)[0]
            seconds += time.process_time() - start
            counts += caption_counts(caption, scene)
        things, stuff = counts
        rows.append(
            {
                "beams": beams,
                "ms_per_image": round(1e3 * seconds / len(scenes), 1),
                "mention_f1": round(f1_of_counts(things + stuff), 3),
                "thing_f1": round(f1_of_counts(things), 3),
                "stuff_f1": round(f1_of_counts(stuff), 3),
                "things_named": int(things[1]),
                "things_true": int(things[2]),
            }
        )
    greedy_ms = rows[0]["ms_per_image"]
    print(f"{args.images} images, seed {args.seed}, model {predictor.model_id}")
    header = f"{'beams':>5} {'ms/image':>9} {'x greedy':>8} {'mention F1':>10} {'things':>7} {'stuff':>6}"
    print(f"{header} things named/true")
    for row in rows:
        ratio = row["ms_per_image"] / greedy_ms
        print(
            f"{row['beams']:>5} {row['ms_per_image']:>9} {ratio:>8.2f} {row['mention_f1']:>10} "
            f"{row['thing_f1']:>7} {row['stuff_f1']:>6} {row['things_named']:>6}/{row['things_true']}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_beams_seed{args.seed}.json"
    out.write_text(json.dumps({"seed": args.seed, "images": args.images, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
