"""Postprocessing of OpenSeeD outputs: pure functions on torch tensors, one image at a time.

Masks are resized by `models.postprocess.resize_mask_logits(..., upsample="bilinear")` (bilinear to
the padded input, crop, bicubic with antialias to the original size). OpenSeeD classifies with
sigmoids (no background class): scores are σ(logits), and semantic and panoptic sharpen them with a
softmax at temperature 0.06 over the classes. Shapes: Q queries, C classes, (h, w) the mask
resolution (1/4 of the padded input), (H, W) the original image size.

    boxes_to_original      (Q, 4) cxcywh of the padded input -> (Q, 4) xyxy original pixels
    semantic_inference     (Q, C), (Q, H, W) -> (C, H, W)
    panoptic_inference     (Q, C), (Q, H, W) -> id map (H, W) int32, segments_info
    instance_inference     (Q, C), (Q, H, W), (Q, 4) -> scores, labels, query_indices, masks, boxes
    detection_inference    (Q, C), (Q, 4) -> scores, labels, query_indices, boxes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import postprocess


@dataclass
class OpenSeeDPostprocessConfig:
    """The official evaluation settings (OBJECT_MASK_THRESHOLD, OVERLAP_THRESHOLD, PANO_TEMPERATURE,
    detections per image)."""

    object_mask_threshold: float = 0.25
    overlap_threshold: float = 0.8
    temperature: float = 0.06
    top_k: int = 100


def boxes_to_original(
    boxes: torch.Tensor,
    padded_hw: tuple[int, int],
    image_hw: tuple[int, int],
    output_hw: tuple[int, int],
) -> torch.Tensor:
    """Boxes (..., 4) cxcywh normalised to the padded input -> xyxy in original-image pixels.

    x scales by W0 * Wp / W and y by H0 * Hp / H (W0: original, Wp: padded, W: resized width).
    Boxes are not clipped to the image.
    """
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
    sx = output_hw[1] * padded_hw[1] / image_hw[1]
    sy = output_hw[0] * padded_hw[0] / image_hw[0]
    return xyxy * torch.tensor([sx, sy, sx, sy], dtype=xyxy.dtype, device=xyxy.device)


def sharpened_probabilities(mask_cls: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(σ(logits) / temperature) over the classes: (Q, C) -> (Q, C)."""
    return F.softmax(mask_cls.float().sigmoid() / temperature, dim=-1)


def semantic_inference(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, temperature: float = 0.06
) -> torch.Tensor:
    """Per-class maps (C, H, W) = Σ_q softmax(σ(logits_q) / T)[c] · σ(mask_q), unnormalised."""
    probs = sharpened_probabilities(mask_cls, temperature)
    return torch.einsum("qc,qhw->chw", probs, mask_pred.float().sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_flags: Sequence[bool],
    object_mask_threshold: float = 0.25,
    overlap_threshold: float = 0.8,
    temperature: float = 0.06,
) -> tuple[torch.Tensor, list[dict]]:
    """Panoptic segment-id map (H, W) int32 (0 = void) and its segments_info.

    Queries whose max σ(logit) is above `object_mask_threshold` are kept; *then* their score and
    label become the max and argmax of softmax(σ(logits) / T). The segment assignment is the
    X-Decoder one (`models.postprocess.panoptic_inference`): it gets the kept queries with those
    probabilities (as log-probabilities, with an impossible background column).
    """
    keep = mask_cls.float().sigmoid().max(dim=-1).values > object_mask_threshold
    probs = sharpened_probabilities(mask_cls[keep], temperature)
    background = probs.new_full((probs.shape[0], 1), float("-inf"))
    log_probs = torch.cat((probs.log(), background), dim=-1)
    panoptic, info = postprocess.panoptic_inference(
        log_probs, mask_pred[keep], thing_flags, -1.0, overlap_threshold
    )
    kept = torch.nonzero(keep).flatten().tolist()
    for segment in info:  # "query": the row in `mask_cls`, not in the kept subset
        segment["query"] = kept[segment["query"]]
    return panoptic, info


def _top_pairs(mask_cls: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k (query, class) pairs of σ(logits) (Q, C): scores, labels, query indices, sorted."""
    num_classes = mask_cls.shape[-1]
    scores = mask_cls.float().sigmoid().flatten()
    top_scores, flat = scores.topk(min(top_k, scores.numel()), sorted=True)
    return top_scores, flat % num_classes, flat // num_classes


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    thing_flags: Sequence[bool],
    top_k: int = 100,
    panoptic_on: bool = True,
) -> dict[str, torch.Tensor]:
    """Top-k (query, class) pairs of σ(logits) as instances (task 'seg').

    With `panoptic_on` only thing classes are kept. Returns "scores" (K,) = σ(logit) · mean σ(mask)
    inside the mask, "labels" (K,), "query_indices" (K,), "masks" (K, H, W) bool (logit > 0) and
    "boxes" (K, 4) xyxy (rows of `boxes_xyxy`), sorted by σ(logit) (the official top-k is unsorted).
    """
    scores, labels, queries = _top_pairs(mask_cls, top_k)
    if panoptic_on:
        is_thing = torch.tensor(list(thing_flags), dtype=torch.bool, device=labels.device)[labels]
        scores, labels, queries = scores[is_thing], labels[is_thing], queries[is_thing]
    logits = mask_pred[queries].float()
    masks = logits > 0
    binary = masks.flatten(1).float()
    mask_scores = (logits.sigmoid().flatten(1) * binary).sum(dim=1) / (binary.sum(dim=1) + 1e-6)
    return {
        "scores": scores * mask_scores,
        "labels": labels,
        "query_indices": queries,
        "masks": masks,
        "boxes": boxes_xyxy[queries],
    }


def detection_inference(
    mask_cls: torch.Tensor, boxes_xyxy: torch.Tensor, top_k: int = 100
) -> dict[str, torch.Tensor]:
    """Top-k (query, class) pairs of σ(logits) with their boxes (task 'det'): every class, no masks.

    Returns "scores" (K,) σ(logit), "labels" (K,), "query_indices" (K,), "boxes" (K, 4) xyxy; sorted.
    """
    scores, labels, queries = _top_pairs(mask_cls, top_k)
    return {"scores": scores, "labels": labels, "query_indices": queries, "boxes": boxes_xyxy[queries]}


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1y1x2y2 -> (x, y, w, h), the API's box form."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)
