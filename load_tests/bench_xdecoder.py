"""X-Decoder Focal-T speed on this CPU: segmentation, captioning and class-name encoding, with the
speed-ups of the exact accelerations measured against the official computations in the same run.

    python load_tests/bench_xdecoder.py [--threads N] [--repeats R] [--config xdecoder-focalt]
                                        [--tasks segment,caption,text]

Uses the deterministic reference checkpoint (made into .cache/ on first use; weights do not change
the cost). Rows:

- segment: the whole `Predictor.segment` call (preprocess to the official 800-px short side, model,
  postprocess) on a 512x512 image, with the vocabulary embedded beforehand;
- caption: `Predictor.caption` (cached greedy decode, 50 steps; early stop never triggers with random
  weights) against the official 50 full passes (`models.decoders.caption_reference`), the two whole
  calls alternating `--repeats` times (the ratio is the median of the pairs), and against
  re-running every prefix without key/value caches, each also without the image encoding
  ("decode only"); the tokens of the three must be identical. A cached step at batch 1 is bound by
  reading the weights, which a batch shares: the batch-of-4 row gives its cost per image;
- text: `Predictor.encode_texts` for a 10-class vocabulary (prompts run up to their longest end
  token) against the same embeddings computed over the full 77-token context; the largest
  difference is printed next to the reference tolerance.

Prints a table and the ratios, writes JSON to load_tests/results/ (named after the config, and the
tasks when only some run).
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
from models.decoders.caption_reference import greedy_caption_full_passes
from models.language.prompts import PROMPT_TEMPLATES, prompts_for
from models.language.text_encoder import LanguageEncoder
from models.language.tokenizer import BOS_ID, ClipTokenizer
from models.predictor import CAPTION_STEPS, Predictor
from models.xdecoder import ImageFeatures, XDecoderModel

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {"xdecoder-focalt": "xdecoder_focalt", "xdecoder-focall": "xdecoder_focall"}
VOCABULARY_10 = ["person", "rocket", "flag", "sky", "wall", "traffic light", "dog", "tree", "car", "building"]
# case.json tolerance (atol_max) of `text.class_embeddings`.
CLASS_EMBEDDING_ATOL = 1e-6


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


def encode_class_names_full_context(
    encoder: LanguageEncoder, names: list[str], tokenizer: ClipTokenizer
) -> torch.Tensor:
    """The class embeddings as the official code computes them: every prompt run over all 77
    positions, 81 prompts of one name per pass. (C, D)."""
    rows = []
    for name in names:
        ids, _ = tokenizer.encode(prompts_for(name), context_length=encoder.config.context_length)
        hidden = encoder.hidden_states(ids)
        features = hidden[torch.arange(ids.shape[0]), ids.argmax(dim=1)] @ encoder.lang_proj
        mean = (features / (features.norm(dim=-1, keepdim=True) + 1e-7)).mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def greedy_caption_prefix_rerun(model: XDecoderModel, features: ImageFeatures, steps: int) -> torch.Tensor:
    """Greedy decode without key/value caches: step s re-runs the text encoder and the caption rows
    over positions 0..s (query rows computed once). (B, 77)."""
    decoder, text = model.decoder, model.text_encoder
    batch = features.memory.mask_features.shape[0]
    tokens = torch.full((batch, model.cfg.text.context_length), BOS_ID, dtype=torch.long)
    state = decoder.caption_state(features.memory)
    vocab = text.lang_encoder.token_embedding.weight
    for s in range(steps):
        rows = decoder.caption_rows(state, text.token_features(tokens[:, : s + 1]))
        tokens[:, s + 1] = (rows[:, s] @ vocab.transpose(0, 1)).argmax(dim=-1)
    return tokens


def bench_segment(predictor: Predictor, image: np.ndarray, repeats: int) -> dict[str, list[float]]:
    vocab = predictor.encode_texts(["person", "rocket", "flag", "sky", "wall"])
    predictor.segment([image], [vocab], "panoptic")  # warm-up
    times = timed(lambda: predictor.segment([image], [vocab], "panoptic"), repeats)
    return {"segment (panoptic, 512 px in, 800 px net)": times}


@torch.inference_mode()
def bench_caption(predictor: Predictor, image: np.ndarray, repeats: int) -> tuple[dict, dict, dict]:
    """Rows, ratios and checks of cached captioning against the official full passes."""
    model = predictor.model
    predictor.caption([image])  # warm-up
    _, features = predictor._encode([image], "captioning")
    rows, tokens = {}, {}
    # The whole calls alternate (cached, official, cached, ...): on a shared machine the load moves
    # between minutes, and a pair sees the same load; the ratio is the median of the pairs' ratios.
    cached, official = [], []
    for _ in range(repeats):
        cached += timed(lambda: predictor.caption([image]), 1)
        official += timed(
            lambda: greedy_caption_full_passes(model, predictor._encode([image], "captioning")[1].memory), 1
        )
    rows["caption, cached (Predictor.caption)"] = cached
    rows["caption, 50 full passes (official)"] = official
    rows["decode only, cached"] = timed(
        lambda: tokens.__setitem__("cached", model.greedy_caption(features, CAPTION_STEPS, False)), repeats
    )
    batch4 = predictor._encode([image] * 4, "captioning")[1]
    rows["decode only, cached, batch of 4 (per image)"] = [
        t / 4 for t in timed(lambda: model.greedy_caption(batch4, CAPTION_STEPS, False), repeats)
    ]
    rows["decode only, prefix re-run (no KV cache)"] = timed(
        lambda: tokens.__setitem__("prefix", greedy_caption_prefix_rerun(model, features, CAPTION_STEPS)), 1
    )
    rows["decode only, 50 full passes (official)"] = timed(
        lambda: tokens.__setitem__("official", greedy_caption_full_passes(model, features.memory)), 1
    )
    med = {name: statistics.median(t) for name, t in rows.items()}
    ratios = {
        "caption: official / cached (median of pairs)": statistics.median(
            slow / fast for slow, fast in zip(official, cached, strict=True)
        ),
        "caption decode: official / cached": med["decode only, 50 full passes (official)"]
        / med["decode only, cached"],
        "caption decode: prefix re-run / cached": med["decode only, prefix re-run (no KV cache)"]
        / med["decode only, cached"],
        "caption decode: official / cached batch of 4": med["decode only, 50 full passes (official)"]
        / med["decode only, cached, batch of 4 (per image)"],
    }
    checks = {
        "caption tokens cached == official (50 steps)": bool(
            torch.equal(tokens["cached"], tokens["official"])
        ),
        "caption tokens prefix re-run == official": bool(torch.equal(tokens["prefix"], tokens["official"])),
    }
    return rows, ratios, checks


@torch.inference_mode()
def bench_text(predictor: Predictor, repeats: int) -> tuple[dict, dict, dict]:
    """Rows, ratios and checks of `encode_texts` (truncated) against the full 77-token context."""
    encoder = predictor.model.text_encoder
    out = {}
    predictor.encode_texts(VOCABULARY_10[:1])  # warm-up
    rows = {
        "encode_texts, 10 classes (truncated)": timed(
            lambda: out.__setitem__("truncated", predictor.encode_texts(VOCABULARY_10)), repeats
        ),
        "encode_texts, 10 classes (full 77 context)": timed(
            lambda: out.__setitem__(
                "full", encode_class_names_full_context(encoder, VOCABULARY_10, predictor.tokenizer)
            ),
            1,
        ),
    }
    med = {name: statistics.median(t) for name, t in rows.items()}
    diff = float((out["truncated"] - out["full"]).abs().max())
    ratios = {
        "encode_texts: full / truncated": med["encode_texts, 10 classes (full 77 context)"]
        / med["encode_texts, 10 classes (truncated)"]
    }
    prompts = [p for name in VOCABULARY_10 for p in prompts_for(name)]
    ids, _ = predictor.tokenizer.encode(prompts)
    checks = {
        f"class embeddings max |truncated - full| = {diff:.2e} <= {CLASS_EMBEDDING_ATOL:g}": diff
        <= CLASS_EMBEDDING_ATOL,
        f"prompts {len(prompts)} ({len(PROMPT_TEMPLATES)} per class), mean end token at "
        f"{float(ids.argmax(dim=1).float().mean()):.1f} of 77": True,
    }
    return rows, ratios, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="xdecoder-focalt", choices=[*sorted(REFERENCE), "demo"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tasks", default="segment,caption,text", help="comma-separated subset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoint = None  # demo: the embedded weights (a quick run of every row)
    if args.config in REFERENCE:
        keys = reference_root() / REFERENCE[args.config] / "keys.json"
        checkpoint = reference_checkpoint(keys, ROOT / ".cache" / "tests")
    predictor = Predictor.from_config(args.config, checkpoint=checkpoint)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)

    tasks = args.tasks.split(",")
    rows: dict[str, list[float]] = {}
    ratios: dict[str, float] = {}
    checks: dict[str, bool] = {}
    if "segment" in tasks:
        rows.update(bench_segment(predictor, image, args.repeats))
    if "caption" in tasks:
        r, q, c = bench_caption(predictor, image, args.repeats)
        rows, ratios, checks = rows | r, ratios | q, checks | c
    if "text" in tasks:
        r, q, c = bench_text(predictor, args.repeats)
        rows, ratios, checks = rows | r, ratios | q, checks | c

    print(f"{args.config}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'task':45s} {'median s/image':>15s} {'min':>8s} {'max':>8s}")
    for name, times in rows.items():
        print(f"{name:45s} {statistics.median(times):15.2f} {min(times):8.2f} {max(times):8.2f}")
    for name, ratio in ratios.items():
        print(f"{name:45s} {ratio:14.1f}x")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")

    subset = "" if set(tasks) >= {"segment", "caption", "text"} else "_" + "-".join(tasks)
    out = ROOT / "load_tests" / "results" / f"bench_xdecoder_{args.config}{subset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": args.config,
        "threads": args.threads,
        "torch": torch.__version__,
        "seconds_per_image": {name: times for name, times in rows.items()},
        "median_seconds_per_image": {name: statistics.median(times) for name, times in rows.items()},
        "ratios": ratios,
        "checks": checks,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
