"""The model-level API the service calls: one object per loaded model.

    predictor = Predictor.from_config(name, checkpoint=None, device="cpu", runtime="torch")
    predictor.encode_texts(names)                  -> Tensor (N, D), template-averaged, normalised
    predictor.segment(images, class_embeddings, task, thing_flags=None, threshold=None)
                                                   -> list[SegmentationResult]
    predictor.refer(images, phrases, multi=False, threshold=None) -> list[ReferringResult]
    predictor.caption(images)                      -> list[str]
    predictor.embed_images(images)                 -> Tensor (B, D)
    predictor.embed_texts(texts)                   -> Tensor (N, D)

Images are RGB uint8 numpy arrays of shape (H, W, 3), each of its own size; a list of them goes
through one batched forward pass with padding. Masks in results are boolean numpy arrays at the
original image size (H, W).
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
