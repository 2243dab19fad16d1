"""`openset train-demo` and `openset eval-demo`: train the embedded demo model, print its scores."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.predictor import DEMO_WEIGHTS

SCORES = Path(__file__).with_name("scores.json")
TARGETS = {
    "seg_miou_seen": 0.85,
    "seg_miou_held_out": 0.60,
    "refer_miou_single": 0.70,
    "refer_empty_share": 0.80,
    "caption_mention_f1": 0.80,
    "retrieval_r1": 0.70,
}


def add_command(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train-demo",
        help="train the demo model on ShapesWorld from scratch (CPU)",
        description="Train the embedded demo model on freshly rendered ShapesWorld images.",
    )
    train.add_argument("--minutes", type=float, default=55.0, help="wall-clock budget (default 55)")
    train.add_argument("--steps", type=int, default=None, help="step budget (whichever ends first)")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1.5e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    train.add_argument(
        "--workers",
        type=int,
        default=1,
        help="training processes, one core each, sharing every batch (the shipped run used 2)",
    )
    train.add_argument(
        "--out", type=Path, default=DEMO_WEIGHTS, help=f"weights file (default {DEMO_WEIGHTS})"
    )
    train.add_argument("--init", type=Path, default=None, help="start from these weights")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "eval-demo",
        help="score the demo model on fresh seeded ShapesWorld images",
        description="Print the ShapesWorld scores of the demo model (or --weights) and write them as JSON.",
    )
    evaluate.add_argument(
        "--weights", type=Path, default=None, help="weights file (default: the shipped ones)"
    )
    evaluate.add_argument("--images", type=int, default=100, help="images for seg / refer / caption")
    evaluate.add_argument("--galleries", type=int, default=2, help="retrieval galleries of 100 images")
    evaluate.add_argument("--seed", type=int, default=2026)
    evaluate.add_argument(
        "--beams", type=int, default=1, help="caption beams (default 1: greedy, what serving does by default)"
    )
    evaluate.add_argument(
        "--json", type=Path, default=SCORES, help=f"where to write the scores (default {SCORES})"
    )
    evaluate.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from models.demo.train import TrainSettings, train

    settings = TrainSettings(
        minutes=args.minutes,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        out=args.out,
        init=args.init,
    )
    train(settings, log=lambda line: print(line, flush=True))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from models.demo.evaluate import EvalSettings, evaluate
    from models.predictor import Predictor

    torch.set_num_threads(1)
    predictor = Predictor.from_config("demo", checkpoint=args.weights)
    settings = EvalSettings(
        num_images=args.images, galleries=args.galleries, seed=args.seed, caption_beams=args.beams
    )
    scores = evaluate(predictor, settings)
    scores["model_id"] = predictor.model_id
    for name, value in scores.items():
        target = TARGETS.get(name)
        note = "" if target is None else f"  (target >= {target}: {'met' if value >= target else 'missed'})"
        print(f"{name:30s} {value if isinstance(value, str) else round(float(value), 4)}{note}")
    args.json.write_text(json.dumps(scores, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0
