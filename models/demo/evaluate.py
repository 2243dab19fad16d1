"""Score a model on fresh, seeded ShapesWorld images through the `Predictor` API (the spec's scores).

    scores = evaluate(predictor, EvalSettings(num_images=100, seed=2026))

- segmentation: semantic mIoU (per class, accumulated over the images) on seen classes and on the
  held-out combinations, and panoptic quality; vocabulary = the classes present plus 3 absent ones;
- referring: mean IoU over single-target phrases (`the <desc>`, `... on the <side>`, `... left of
  ...`; the best match), also per form, IoU of the union for `all ...` / `every ...` phrases (every
  match above the threshold), share of empty answers for phrases naming an absent combination;
- captioning: F1 of the (size?, colour, shape) and stuff mentions against the true caption;
- retrieval: text-to-image recall@1 and @5 over galleries of 100 images and their true captions.

Images come from `render_scene(..., allow_held_out=True)`, so held-out combinations appear.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from models.demo.phrases import sample_phrase, scene_mentions
from models.demo.shapesworld import HELD_OUT, SHAPES, STUFF_COLOURS, THING_COLOURS, Scene, render_scene
from models.predictor import Predictor

HELD_OUT_NAMES = frozenset(f"{c} {s}" for c, s in HELD_OUT)
SIZE_WORDS = ("small", "large")
# the single-target phrase forms and the name of each one's score: "the <desc>", "the <desc> on
# the <side>", "the <desc> left of / right of the <desc2>"
SINGLE_FORM_SCORES = {
    "single": "refer_miou_description",
    "extreme": "refer_miou_side",
    "relation": "refer_miou_relation",
}
SINGLE_FORMS = tuple(SINGLE_FORM_SCORES)


@dataclass
class EvalSettings:
    num_images: int = 100  # segmentation, referring and captioning images
    galleries: int = 2  # retrieval galleries
    gallery_size: int = 100
    seed: int = 2026
    batch_size: int = 16
    caption_beams: int = 1  # 1: greedy captions, as served by default; more: beam search


def render_scenes(rng: np.random.Generator, count: int) -> list[Scene]:
    return [render_scene(rng, allow_held_out=True) for _ in range(count)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def class_masks(scene: Scene) -> dict[str, np.ndarray]:
    """Ground-truth mask of every class present (thing classes as the union of their instances)."""
    masks: dict[str, np.ndarray] = {}
    for thing in scene.things:
        masks[thing.name] = masks.get(thing.name, np.zeros_like(thing.mask)) | thing.mask
    for region in scene.stuff:
        if region.mask.any():
            masks[region.name] = region.mask
    return masks


def distractors(rng: np.random.Generator, present: list[str], count: int = 3) -> list[str]:
    """`count` absent class names (thing combinations, held-out ones included, or stuff)."""
    names = [f"{c} {s}" for c in THING_COLOURS for s in SHAPES] + list(STUFF_COLOURS)
    absent = [n for n in names if n not in present]
    return [absent[i] for i in sorted(rng.permutation(len(absent))[:count])]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def panoptic_quality(scene: Scene, segments: list, vocabulary: list[str]) -> tuple[float, int, int, int]:
    """(sum of matched IoUs, TP, FP, FN) of one image; a match is the same class with IoU > 0.5."""
    truth = [(t.name, t.mask) for t in scene.things] + [(r.name, r.mask) for r in scene.stuff if r.mask.any()]
    used, iou_sum, tp = set(), 0.0, 0
    for seg in segments:
        name = vocabulary[seg.label_index]
        for k, (true_name, mask) in enumerate(truth):
            if k not in used and true_name == name:
                value = iou(seg.mask, mask)
                if value > 0.5:
                    used.add(k)
                    iou_sum += value
                    tp += 1
                    break
    return iou_sum, tp, len(segments) - tp, len(truth) - tp


def evaluate_segmentation(
    predictor: Predictor, scenes: list[Scene], rng: np.random.Generator, batch_size: int
) -> dict[str, float]:
    inter: Counter[str] = Counter()
    union: Counter[str] = Counter()
    pq_iou, tp, fp, fn = 0.0, 0, 0, 0
    for group in chunks(scenes, batch_size):
        vocabularies, flags = [], []
        for scene in group:
            present = scene.class_names()
            vocabularies.append(present + distractors(rng, present))
            flags.append([n not in STUFF_COLOURS for n in vocabularies[-1]])
        embeddings = [predictor.encode_texts(v) for v in vocabularies]
        images = [s.image for s in group]
        semantic = predictor.segment(images, embeddings, "semantic", thing_flags=flags)
        panoptic = predictor.segment(images, embeddings, "panoptic", thing_flags=flags)
        for scene, vocab, sem, pan in zip(group, vocabularies, semantic, panoptic, strict=True):
            predicted: dict[str, np.ndarray] = {}
            for seg in sem.segments:
                predicted[vocab[seg.label_index]] = seg.mask
            for name, mask in class_masks(scene).items():
                guess = predicted.get(name, np.zeros_like(mask))
                inter[name] += int(np.logical_and(mask, guess).sum())
                union[name] += int(np.logical_or(mask, guess).sum())
            s, t, f, n = panoptic_quality(scene, pan.segments, vocab)
            pq_iou, tp, fp, fn = pq_iou + s, tp + t, fp + f, fn + n
    per_class = {name: inter[name] / union[name] for name in union if union[name]}
    seen = [v for k, v in per_class.items() if k not in HELD_OUT_NAMES]
    held = [v for k, v in per_class.items() if k in HELD_OUT_NAMES]
    return {
        "seg_miou_seen": float(np.mean(seen)) if seen else float("nan"),
        "seg_miou_held_out": float(np.mean(held)) if held else float("nan"),
        "seg_held_out_classes": len(held),
        "panoptic_quality": pq_iou / max(tp + 0.5 * fp + 0.5 * fn, 1e-9),
    }


def evaluate_referring(
    predictor: Predictor, scenes: list[Scene], rng: np.random.Generator, batch_size: int
) -> dict[str, float]:
    single, multi, empty = [], [], []
    by_form: dict[str, list[float]] = {form: [] for form in SINGLE_FORMS}
    for group in chunks(scenes, batch_size):
        images = [s.image for s in group]
        for kind in ("single", "all", "absent"):
            if kind == "single":  # one target: "the <desc>", "... on the <side>", "... left of ..."
                forms = [SINGLE_FORMS[rng.integers(len(SINGLE_FORMS))] for _ in group]
            else:
                forms = [kind] * len(group)
            phrases = [
                sample_phrase(rng, s, allow_held_out=True, form=f) for s, f in zip(group, forms, strict=True)
            ]
            texts = [p.text for p in phrases]
            results = predictor.refer(images, texts, multi=kind != "single")
            for scene, phrase, result in zip(group, phrases, results, strict=True):
                truth = np.zeros(scene.image.shape[:2], dtype=bool)
                for i in phrase.targets:
                    truth |= scene.things[i].mask
                answer = np.zeros_like(truth)
                for match in result.matches:
                    answer |= match.mask
                if kind == "single":
                    if len(phrase.targets) == 1:  # (a scene where no single-target phrase fits is skipped)
                        single.append(iou(answer, truth))
                        # (a drawn form that does not fit the scene falls back to `the <desc>`)
                        by_form[phrase.form].append(single[-1])
                elif not phrase.targets:
                    empty.append(float(not result.matches))
                else:
                    multi.append(iou(answer, truth))
    scores = {
        "refer_miou_single": float(np.mean(single)) if single else float("nan"),
        "refer_miou_multi": float(np.mean(multi)) if multi else float("nan"),
        "refer_empty_share": float(np.mean(empty)) if empty else float("nan"),
    }
    for form, name in SINGLE_FORM_SCORES.items():
        scores[name] = float(np.mean(by_form[form])) if by_form[form] else float("nan")
        scores[f"{name}_phrases"] = len(by_form[form])
    return scores


def parse_caption(text: str) -> tuple[list[tuple[str | None, str, str]], list[str]]:
    """Mentions (size?, colour, shape) and stuff names (full, or top then bottom) read from a caption of
    the ShapesWorld pattern."""
    things_part, _, stuff_part = text.partition(" on ")
    mentions = []
    for chunk in re.split(r",| and ", things_part):
        words = chunk.split()
        size = next((w for w in words if w in SIZE_WORDS), None)
        colour = next((w for w in words if w in THING_COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if colour and shape:
            mentions.append((size, colour, shape))
    bottom, _, top = stuff_part.partition(" under ")  # "on <bottom> under <top>"
    stuff = [w for w in (top.strip(), bottom.strip()) if w in STUFF_COLOURS]
    return mentions, stuff


def f1(predicted: list, truth: list) -> tuple[int, int, int]:
    """(matches, predicted count, true count) of two multisets."""
    hits = sum((Counter(predicted) & Counter(truth)).values())
    return hits, len(predicted), len(truth)


def caption_counts(caption: str, scene: Scene) -> np.ndarray:
    """(2, 3): (matches, predicted, true) of the thing mentions (row 0) and the stuff names (row 1)."""
    mentions, stuff = parse_caption(caption)
    true_mentions, true_stuff = scene_mentions(scene)
    return np.array([f1(mentions, true_mentions), f1(stuff, true_stuff)], dtype=float)


def f1_of_counts(counts: np.ndarray) -> float:
    """F1 of summed (matches, predicted, true) counts (3,)."""
    return float(2 * counts[0] / max(counts[1] + counts[2], 1))


def evaluate_captioning(
    predictor: Predictor, scenes: list[Scene], batch_size: int, beams: int = 1
) -> dict[str, float]:
    counts = np.zeros((2, 3))
    for group in chunks(scenes, batch_size):
        captions = predictor.caption([s.image for s in group], beams=beams)
        for scene, caption in zip(group, captions, strict=True):
            counts += caption_counts(caption, scene)
    return {
        "caption_thing_f1": f1_of_counts(counts[0]),
        "caption_stuff_f1": f1_of_counts(counts[1]),
        "caption_mention_f1": f1_of_counts(counts.sum(axis=0)),
    }


def evaluate_retrieval(
    predictor: Predictor, rng: np.random.Generator, galleries: int, size: int, batch_size: int
) -> dict[str, float]:
    at1, at5 = [], []
    for _ in range(galleries):
        scenes = render_scenes(rng, size)
        captions = [s.caption for s in scenes]
        scores = np.concatenate(
            [predictor.retrieve([s.image for s in g], captions).numpy() for g in chunks(scenes, batch_size)]
        )  # (images, texts)
        for j, caption in enumerate(captions):
            ranked = np.argsort(-scores[:, j], kind="stable")
            hits = [captions[i] == caption for i in ranked[:5]]  # an identical caption counts as right
            at1.append(float(hits[0]))
            at5.append(float(any(hits)))
    return {"retrieval_r1": float(np.mean(at1)), "retrieval_r5": float(np.mean(at5))}


def evaluate(predictor: Predictor, settings: EvalSettings) -> dict[str, float]:
    """Every score of the spec on fresh images drawn from `settings.seed`."""
    rng = np.random.default_rng(settings.seed)
    scenes = render_scenes(rng, settings.num_images)
    scores: dict[str, float] = {"images": settings.num_images, "seed": settings.seed}
    scores |= evaluate_segmentation(predictor, scenes, rng, settings.batch_size)
    scores |= evaluate_referring(predictor, scenes, rng, settings.batch_size)
    scores |= evaluate_captioning(predictor, scenes, settings.batch_size, settings.caption_beams)
    scores["caption_beams"] = settings.caption_beams
    if settings.galleries:
        scores |= evaluate_retrieval(
            predictor, rng, settings.galleries, settings.gallery_size, settings.batch_size
        )
    return scores
