"""Postprocessing of X-Decoder head outputs: pure functions on torch tensors, one image at a time.

Shapes: Q queries (101 in segmentation, the class query included), C classes (the "no object" /
background column is the last of C + 1 logits), (h, w) the mask resolution of the head (1/4 of the
padded input), (H, W) the output size (the original image).

    resize_mask_logits     (Q, h, w) -> (Q, H, W)            upsample, crop, resize (each bicubic or bilinear)
    semantic_inference     (Q, C+1), (Q, H, W) -> (C, H, W)
    panoptic_inference     (Q, C+1), (Q, H, W) -> id map (H, W) int32, segments_info
    instance_inference     (Q, C+1), (Q, H, W) -> scores, labels, query_indices, masks (K, H, W)
    grounding_scores       (Q, D), (D,) -> (Q,);  select_referring -> query indices
    caption_from_tokens    ids (L,) -> caption text
    retrieval_scores       (B, D), (B, D), (N, D) -> (B, N)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.language.tokenizer import BOS_TOKEN, EOS_TOKEN, ClipTokenizer


def resize_mask_logits(
    mask_logits: torch.Tensor,
    padded_hw: tuple[int, int],
    image_hw: tuple[int, int],
    output_hw: tuple[int, int],
    upsample: str = "bicubic",
    final: str = "bicubic",
) -> torch.Tensor:
    """Mask logits (Q, h, w) of a padded input -> (Q, H, W) at the original image size, in float32.

    Upsample to the padded input size `padded_hw`, crop to the unpadded network input `image_hw`,
    resize to `output_hw`. Each resize is "bicubic" (with antialias) or "bilinear" (without), always
    align_corners=False: X-Decoder uses bicubic twice, OpenSeeD bilinear then bicubic, Mask2Former
    (detectron2's `sem_seg_postprocess`) bilinear twice.
    """
    x = mask_logits.float().unsqueeze(0)
    x = F.interpolate(x, size=tuple(padded_hw), **_RESIZE[upsample])
    x = x[:, :, : image_hw[0], : image_hw[1]]
    x = F.interpolate(x, size=tuple(output_hw), **_RESIZE[final])
    return x[0]


_RESIZE = {
    "bicubic": {"mode": "bicubic", "align_corners": False, "antialias": True},
    "bilinear": {"mode": "bilinear", "align_corners": False},
}


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class score maps (C, H, W) = sum over queries of P(class) * sigmoid(mask), unnormalised.

    mask_cls (Q, C+1) logits; the background column is dropped after the softmax. mask_pred (Q, H, W).
    """
    probs = mask_cls.softmax(dim=-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_flags: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict]]:
    """Panoptic segment-id map (H, W) int32 (0 = void) and its segments_info.

    Queries whose best class is not background and whose probability is > `object_mask_threshold`
    compete per pixel by probability * sigmoid(mask). In query order, a query keeps the pixels it wins
    where its own sigmoid >= 0.5, unless that area is below `overlap_threshold` of its own
    (sigmoid >= 0.5) area; queries of a stuff class already present join that class's segment.

    segments_info entries: {"id" (from 1), "category_id", "isthing", "score" (the class probability
    of the query that opened the segment), "query" (that query's row in `mask_cls`)}. thing_flags has
    one bool per class (C).
    """
    height, width = mask_pred.shape[-2:]
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = mask_cls.softmax(dim=-1).max(dim=-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    panoptic = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)
    if not bool(keep.any()):
        return panoptic, []

    kept = torch.nonzero(keep).flatten().tolist()  # query index of each kept row
    cur_scores, cur_classes = scores[keep], labels[keep]
    cur_masks = mask_pred[keep].sigmoid()
    owner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(dim=0)  # (H, W) index into the kept queries
    own_mask = cur_masks >= 0.5
    visible = own_mask.gather(0, owner.unsqueeze(0))[0]  # the owner's own mask covers the pixel
    k = len(cur_scores)
    won_area = torch.bincount(owner.flatten(), minlength=k).tolist()
    own_area = own_mask.flatten(1).sum(dim=1).tolist()
    visible_area = torch.bincount(owner[visible], minlength=k).tolist()

    segment_of_query = [0] * k
    segments_info: list[dict] = []
    stuff_segment: dict[int, int] = {}
    for q in range(k):
        if won_area[q] == 0 or own_area[q] == 0 or visible_area[q] == 0:
            continue
        if won_area[q] / own_area[q] < overlap_threshold:
            continue
        category = int(cur_classes[q])
        isthing = bool(thing_flags[category])
        if not isthing and category in stuff_segment:
            segment_of_query[q] = stuff_segment[category]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[category] = segment_id
        segment_of_query[q] = segment_id
        segments_info.append(
            {
                "id": segment_id,
                "category_id": category,
                "isthing": isthing,
                "score": float(cur_scores[q]),
                "query": int(kept[q]),
            }
        )
    lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=mask_pred.device)
    panoptic = torch.where(visible, lookup[owner], panoptic)
    return panoptic, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_flags: Sequence[bool],
    top_k: int = 100,
    panoptic_on: bool = True,
) -> dict[str, torch.Tensor]:
    """Top-k (query, class) pairs of the flattened (Q, C) class probabilities, as instances.

    With `panoptic_on` only thing classes are kept (as the official evaluation does). Returns
    "scores" (K,) = class probability * mean sigmoid inside the mask, "labels" (K,), "query_indices"
    (K,) and "masks" (K, H, W) bool (logit > 0), sorted by class probability (the official top-k is
    unsorted; the set is the same).
    """
    num_classes = mask_cls.shape[-1] - 1
    probs = mask_cls.softmax(dim=-1)[:, :-1].flatten()
    class_scores, flat_indices = probs.topk(min(top_k, probs.numel()), sorted=True)
    labels = flat_indices % num_classes
    query_indices = flat_indices // num_classes
    if panoptic_on:
        is_thing = torch.tensor(list(thing_flags), dtype=torch.bool, device=labels.device)[labels]
        class_scores, labels, query_indices = (
            class_scores[is_thing],
            labels[is_thing],
            query_indices[is_thing],
        )
    logits = mask_pred[query_indices]
    masks = logits > 0
    binary = masks.flatten(1).to(logits.dtype)
    mask_scores = (logits.sigmoid().flatten(1) * binary).sum(dim=1) / (binary.sum(dim=1) + 1e-6)
    return {
        "scores": class_scores * mask_scores,
        "labels": labels,
        "query_indices": query_indices,
        "masks": masks,
    }


def grounding_scores(
    query_embeddings: torch.Tensor, text_embedding: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """min(exp(logit_scale), 100) * cosine of each query with the text: (Q, D), (D,) -> (Q,).

    Both sides are divided by (norm + 1e-7). A text matrix (N, D) gives (Q, N).
    """
    queries = query_embeddings / (query_embeddings.norm(dim=-1, keepdim=True) + 1e-7)
    text = text_embedding / (text_embedding.norm(dim=-1, keepdim=True) + 1e-7)
    scale = torch.as_tensor(logit_scale, dtype=queries.dtype, device=queries.device).exp().clamp(max=100)
    return scale * (queries @ text.transpose(0, -1))


def select_referring(scores: torch.Tensor, multi: bool, threshold: float | None = None) -> list[int]:
    """Grounding queries to return for one phrase, from their scores (Q,).

    multi=False: the best query (ties: the first). multi=True: every query whose score is above
    `threshold`, best first; possibly none.
    """
    if not multi:
        return [int(scores.argmax())]
    if threshold is None:
        raise ValueError("multi-match referring needs a threshold")
    above = torch.nonzero(scores > threshold).flatten()
    order = scores[above].argsort(descending=True, stable=True)
    return above[order].tolist()


def caption_from_tokens(
    token_ids: Sequence[int] | torch.Tensor, tokenizer: ClipTokenizer, cut_at_period: bool = True
) -> str:
    """Caption text of greedy-decoded ids (L,).

    The decoded text is cut at the first <|endoftext|>, the <|startoftext|> tokens are removed and the
    ends stripped (the official `pred_text`). With `cut_at_period` (the default, what the API returns)
    only the text before the first "." is kept, as the official captioning evaluation does.
    """
    text = tokenizer.decode(token_ids)
    text = text.split(EOS_TOKEN, 1)[0].replace(BOS_TOKEN, "").strip()
    if cut_at_period:
        text = text.split(".", 1)[0]
    return text


def retrieval_scores(
    image_emb_decoder: torch.Tensor, image_emb_backbone: torch.Tensor, text_emb: torch.Tensor
) -> torch.Tensor:
    """Image x text scores (B, N) = 0.5 cos(backbone embedding, text) + 0.5 cos(decoder embedding, text).

    image_emb_decoder (B, D) is the pooled class query, image_emb_backbone (B, D) the pooled res5
    projection, text_emb (N, D) the EOS features. Norms have no epsilon here.
    """
    text = text_emb / text_emb.norm(dim=-1, keepdim=True)
    decoder = image_emb_decoder / image_emb_decoder.norm(dim=-1, keepdim=True)
    backbone = image_emb_backbone / image_emb_backbone.norm(dim=-1, keepdim=True)
    return 0.5 * (backbone @ text.T) + 0.5 * (decoder @ text.T)
