"""Training examples: rendered scenes turned into model inputs and per-task targets.

Every image carries targets for all four tasks, so one forward pass of the image encoder serves the
whole recipe:

- segmentation: one segment per thing and per stuff region, labelled in a per-image vocabulary
  (the classes present plus absent distractors; thing classes named "<colour> <shape>", or by shape
  alone for a share of the images);
- referring: one phrase with its target masks (possibly none);
- captioning and retrieval: the caption, plus perturbed captions as hard negatives.

Images are resized to a fixed square (the demo config's input size); masks become soft targets at
that size (the share of each pixel's area that is covered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.configs import ResizeRule
from models.demo.phrases import Phrase, perturbed_caption, sample_phrase
from models.demo.shapesworld import HELD_OUT, SHAPES, STUFF_COLOURS, THING_COLOURS, Scene, render_scene
from models.preprocess import normalize, resize_image

NUM_DISTRACTORS = 3
SHAPE_VOCAB_SHARE = 0.2  # images whose thing classes are named by shape alone ("circle")
NUM_NEGATIVE_CAPTIONS = 3


@dataclass
class Example:
    """One image and its targets. masks (N, S, S) float in [0, 1]; labels (N,) index `vocabulary`."""

    image: torch.Tensor  # (3, S, S) normalised
    vocabulary: list[str]
    labels: torch.Tensor
    masks: torch.Tensor
    phrase: Phrase
    phrase_masks: torch.Tensor  # (K, S, S), one per target (K may be 0)
    caption: str
    negatives: list[str]


def soft_masks(masks: list[np.ndarray], size: int) -> torch.Tensor:
    """Bool masks (H, W) -> (N, size, size) float: the covered share of each output pixel."""
    if not masks:
        return torch.zeros(0, size, size)
    stacked = torch.from_numpy(np.stack(masks)).float()[:, None]
    return F.interpolate(stacked, size=(size, size), mode="area")[:, 0]


def thing_vocabulary(
    by_shape: bool, rng: np.random.Generator, scene: Scene, allow_held_out: bool
) -> list[str]:
    """Names of the thing classes present plus up to `NUM_DISTRACTORS` absent ones."""
    if by_shape:
        present = sorted({t.shape for t in scene.things})
        absent = [s for s in SHAPES if s not in present]
    else:
        present = sorted({t.name for t in scene.things})
        absent = [
            f"{c} {s}"
            for c in THING_COLOURS
            for s in SHAPES
            if f"{c} {s}" not in present and (allow_held_out or (c, s) not in HELD_OUT)
        ]
    picked = rng.permutation(len(absent))[:NUM_DISTRACTORS]
    return present + [absent[i] for i in sorted(picked)]


def make_example(rng: np.random.Generator, size: int, allow_held_out: bool = False) -> Example:
    """Render a scene and build its targets at a fixed square input size."""
    scene = render_scene(rng, allow_held_out=allow_held_out)
    image = normalize(resize_image(scene.image, ResizeRule(fixed=(size, size))))
    by_shape = rng.random() < SHAPE_VOCAB_SHARE
    things = thing_vocabulary(by_shape, rng, scene, allow_held_out)
    stuff_present = [s.name for s in scene.stuff]
    stuff_absent = [n for n in STUFF_COLOURS if n not in stuff_present]
    extra = [stuff_absent[i] for i in rng.permutation(len(stuff_absent))[:1]]
    vocabulary = things + stuff_present + extra
    segments, labels = [], []
    for thing in scene.things:
        segments.append(thing.mask)
        labels.append(vocabulary.index(thing.shape if by_shape else thing.name))
    for region in scene.stuff:
        if region.mask.any():
            segments.append(region.mask)
            labels.append(vocabulary.index(region.name))
    phrase = sample_phrase(rng, scene, allow_held_out=allow_held_out)
    negatives = [perturbed_caption(rng, scene, allow_held_out) for _ in range(NUM_NEGATIVE_CAPTIONS)]
    return Example(
        image=image,
        vocabulary=vocabulary,
        labels=torch.tensor(labels, dtype=torch.long),
        masks=soft_masks(segments, size),
        phrase=phrase,
        phrase_masks=soft_masks([scene.things[i].mask for i in phrase.targets], size),
        caption=scene.caption,
        negatives=negatives,
    )


def make_batch(rng: np.random.Generator, batch_size: int, size: int) -> list[Example]:
    """`batch_size` training examples (held-out combinations excluded)."""
    return [make_example(rng, size) for _ in range(batch_size)]
