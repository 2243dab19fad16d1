"""Training examples: rendered scenes turned into model inputs and per-task targets.

Every image carries targets for all four tasks, so one forward pass of the image encoder serves the
whole recipe:

- segmentation: one segment per thing and per stuff region, labelled in a per-image vocabulary
  (the classes present plus absent distractors; thing classes named "<colour> <shape>", or by shape
  alone for a share of the images);
- referring: one phrase with its target masks (possibly none);
- captioning and retrieval: the caption, plus perturbed captions as hard negatives.

Images are resized by the demo config's rule (a constant scale, so a radius keeps its size in
pixels) and masks become soft targets at that size (the share of each pixel's area that is covered).
A batch pads its images like `models.preprocess.batch_images` (zeros after normalisation, each image
to a multiple of 32, the batch to its largest); `ExampleStream` groups images of similar size so that
little of a batch is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.configs import ResizeRule
from models.demo.phrases import Phrase, perturbed_caption, sample_phrase
from models.demo.shapesworld import HELD_OUT, SHAPES, STUFF_COLOURS, THING_COLOURS, Scene, render_scene
from models.preprocess import normalize, padded_size, resize_image

NUM_DISTRACTORS = 3
SHAPE_VOCAB_SHARE = 0.2  # images whose thing classes are named by shape alone ("circle")
NUM_NEGATIVE_CAPTIONS = 3
SIZE_CLASS = {"small": 0, None: 1, "large": 2}
# Colour alone tells most classes apart. So that shapes matter to the losses, the training vocabulary
# also names every absent combination in a colour that is present ("red star" next to a red circle),
# and half of the absent referring phrases are of that kind: only the shape separates them from what
# is in the image.
ABSENT_PHRASE_SHAPE_CONTRASTS = 0.5
# Phrase forms drawn in training, in `phrases.FORMS` order (single, extreme, relation, all, absent).
# A drawn form that cannot fit the scene falls back to a single-target or an absent phrase, so the
# shares that come out are about 34 / 6 / 16 / 18 / 27 % (600 training scenes), within two points of
# what run 9a got from the earlier draw; the shipped run 15a trained with these. Drawing the side form
# ("the red circle on the left") two or three times as often did not make it better (runs 13a and 13b
# in the model card).
TRAINING_PHRASE_FORMS = (0.255, 0.125, 0.205, 0.165, 0.25)


@dataclass
class Example:
    """One image and its targets at the resized size (h, w). masks (N, h, w) float in [0, 1]; labels
    (N,) index `vocabulary`."""

    image: torch.Tensor  # (3, h, w) normalised
    vocabulary: list[str]
    labels: torch.Tensor
    masks: torch.Tensor
    phrase: Phrase
    phrase_masks: torch.Tensor  # (K, h, w), one per target (K may be 0)
    caption: str
    negatives: list[str]
    shapes: torch.Tensor  # (T,) the things' shapes (index into SHAPES); masks[:T] are the things
    size_classes: torch.Tensor  # (T,) 0 small, 1 no size word, 2 large
    caption_order: torch.Tensor  # (T,) each thing's place in the caption (left to right by centre)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])


@dataclass
class Batch:
    """Examples padded into one tensor. images (B, 3, H, W); `padded_sizes` each image's own padded
    size (what `XDecoderModel.encode_images` takes), None when every image fills the batch; masks
    and phrase masks of the examples are zero-padded to (H, W)."""

    images: torch.Tensor
    padded_sizes: list[tuple[int, int]] | None
    examples: list[Example]

    def mask_area(self, i: int, mask_size: tuple[int, int]) -> tuple[int, int]:
        """Image i's own (h, w) in mask logits of `mask_size` (the batch at 1/4): the area losses use."""
        h, w = self.examples[i].size
        big_h, big_w = self.images.shape[-2:]
        return -(-h * mask_size[0] // big_h), -(-w * mask_size[1] // big_w)


def soft_masks(masks: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Bool masks (H, W) -> (N, h, w) float: the covered share of each output pixel."""
    if not masks:
        return torch.zeros(0, *size)
    stacked = torch.from_numpy(np.stack(masks)).float()[:, None]
    return F.interpolate(stacked, size=size, mode="area")[:, 0]


def thing_vocabulary(
    by_shape: bool, rng: np.random.Generator, scene: Scene, allow_held_out: bool
) -> list[str]:
    """Names of the thing classes present plus up to `NUM_DISTRACTORS` random absent ones and, for
    colour-and-shape names, every absent combination in a colour that is present (shape contrasts)."""
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
    picked = set(rng.permutation(len(absent))[:NUM_DISTRACTORS].tolist())
    if not by_shape:
        colours = {t.colour for t in scene.things}
        picked |= {i for i, name in enumerate(absent) if name.split()[0] in colours}
    return present + [absent[i] for i in sorted(picked)]


def make_example(rng: np.random.Generator, rule: ResizeRule, allow_held_out: bool = False) -> Example:
    """Render a scene and build its targets at the size `rule` resizes it to."""
    scene = render_scene(rng, allow_held_out=allow_held_out)
    image = normalize(resize_image(scene.image, rule))
    size = (int(image.shape[1]), int(image.shape[2]))
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
    phrase = sample_phrase(
        rng,
        scene,
        TRAINING_PHRASE_FORMS,
        allow_held_out=allow_held_out,
        shape_contrast_share=ABSENT_PHRASE_SHAPE_CONTRASTS,
    )
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
        shapes=torch.tensor([SHAPES.index(t.shape) for t in scene.things], dtype=torch.long),
        size_classes=torch.tensor([SIZE_CLASS[t.size_word] for t in scene.things], dtype=torch.long),
        caption_order=caption_order(scene),
    )


def caption_order(scene: Scene) -> torch.Tensor:
    """(T,) each thing's place among the caption's mentions (the caption's left-to-right sort)."""
    order = sorted(range(len(scene.things)), key=lambda k: scene.things[k].centre[0])
    places = torch.empty(len(order), dtype=torch.long)
    places[order] = torch.arange(len(order))
    return places


def pad_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., H, W), zeros on the right and bottom."""
    return F.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]))


def collate(examples: list[Example]) -> Batch:
    """Pad examples into a `Batch` (the padding of `models.preprocess.batch_images`)."""
    padded = [padded_size(*ex.size) for ex in examples]
    big = (max(h for h, _ in padded), max(w for _, w in padded))
    images = torch.stack([pad_to(ex.image, big) for ex in examples])
    for ex in examples:
        ex.masks, ex.phrase_masks = pad_to(ex.masks, big), pad_to(ex.phrase_masks, big)
    return Batch(images, None if all(p == big for p in padded) else padded, examples)


def make_batch(rng: np.random.Generator, batch_size: int, rule: ResizeRule) -> Batch:
    """`batch_size` training examples (held-out combinations excluded), padded into a batch."""
    return collate([make_example(rng, rule) for _ in range(batch_size)])


class ExampleStream:
    """Training batches of images of similar size, so that little of a batch is padding.

    Keeps `pool_size` rendered examples; each batch is the oldest of them plus the `batch_size - 1`
    closest to it in padded size. Every rendered example is used once, in at most a few batches'
    delay, so the images seen follow the renderer's distribution.
    """

    def __init__(
        self, rng: np.random.Generator, rule: ResizeRule, batch_size: int, pool_size: int = 64
    ) -> None:
        self.rng, self.rule, self.batch_size = rng, rule, batch_size
        self.pool_size = max(pool_size, batch_size)
        self.pool: list[Example] = []

    def next_batch(self) -> Batch:
        while len(self.pool) < self.pool_size:
            self.pool.append(make_example(self.rng, self.rule))
        oldest_h, oldest_w = padded_size(*self.pool[0].size)

        def distance(k: int) -> int:
            h, w = padded_size(*self.pool[k].size)
            return abs(h - oldest_h) + abs(w - oldest_w)

        nearest = sorted(range(1, len(self.pool)), key=distance)[: self.batch_size - 1]
        chosen = [0, *sorted(nearest)]
        batch = [self.pool[k] for k in chosen]
        self.pool = [ex for k, ex in enumerate(self.pool) if k not in chosen]
        return collate(batch)
