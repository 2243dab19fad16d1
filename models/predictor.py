"""The model-level API the service calls: one object per loaded model.

    predictor = Predictor.from_config(name, checkpoint=None, device="cpu", runtime="torch")
    predictor.model_id                              -> str, config name + checkpoint hash (cache keys)
    predictor.info                                  -> dict: name, tasks, runtime, device, input sizes
    predictor.encode_texts(names)                   -> Tensor (N, D): one class embedding per name,
                                                       81-template averaged, normalised
    predictor.segment(images, class_embeddings, task, thing_flags=None, threshold=None)
                                                    -> list[SegmentationResult]
    predictor.refer(images, phrases, multi=False, threshold=None) -> list[ReferringResult]
    predictor.caption(images)                       -> list[str]
    predictor.embed_images(images)                  -> Tensor (B, D)
    predictor.embed_texts(texts)                    -> Tensor (N, D)
    predictor.retrieve(images, texts)               -> Tensor (B, N): image x text scores

Conventions:
- `images` is a list of RGB uint8 numpy arrays (H, W, 3), each of its own size; the list goes through
  one batched forward pass with padding and gives the same results as one image at a time.
- `class_embeddings` is a list with one (C_i, D) tensor per image (rows of `encode_texts`), so images
  with different vocabularies share a batch; "background" is appended inside `segment`.
  `thing_flags` is a list with one list of C_i bools per image (None: every class is a thing).
- `task` is "semantic", "instance" or "panoptic". `threshold` overrides the task's score threshold.
- `refer` takes one phrase per image. `multi=False` returns the best match; `multi=True` every
  grounding query whose score passes the threshold, possibly none.
- Masks in results are boolean numpy arrays at the original image size (H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Segment:
    """One segment of a segmentation result.

    `label_index` indexes the vocabulary the caller passed (background is never returned).
    `mask` is a bool array (H, W) at the original image size.
    """

    id: int
    label_index: int
    score: float
    isthing: bool
    mask: np.ndarray


@dataclass
class SegmentationResult:
    """Result of `Predictor.segment` for one image; `task` is semantic, instance or panoptic."""

    task: str
    image_size: tuple[int, int]  # (H, W) of the original image
    segments: list[Segment] = field(default_factory=list)


@dataclass
class ReferringMatch:
    """One grounding match: its score and bool mask (H, W) at the original image size."""

    score: float
    mask: np.ndarray


@dataclass
class ReferringResult:
    """Result of `Predictor.refer` for one (image, phrase) pair; `matches` may be empty."""

    phrase: str
    image_size: tuple[int, int]
    matches: list[ReferringMatch] = field(default_factory=list)
