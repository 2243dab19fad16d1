"""Panoptic segmentation upsamples only the masks of the queries it keeps: same segments as with all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.postprocess import panoptic_inference, resize_mask_logits
from models.predictor import mask_rows


def test_kept_query_masks_give_the_same_panoptic_result(reference_root: Path) -> None:
    """The synthetic postproc case keeps 14 of 101 queries, with stuff merges and overlap rejections."""
    case_dir = reference_root / "xdecoder_focalt" / "case_a"
    npz = np.load(case_dir / "postproc.npz")
    task = json.loads((case_dir / "case.json").read_text())["tasks"]["postproc"]
    logits = torch.from_numpy(npz["input.mask_cls"])
    lowres = torch.from_numpy(npz["input.mask_pred_lowres"])
    flags = [c in task["thing_class_indices"] for c in range(task["num_classes"])]
    sizes = [tuple(npz[f"input.{k}_size_hw"].tolist()) for k in ("padded", "image", "output")]

    rows = mask_rows("panoptic", logits, None)
    assert 0 < len(rows) < logits.shape[0]
    full, full_info = panoptic_inference(logits, resize_mask_logits(lowres, *sizes), flags)
    kept, kept_info = panoptic_inference(logits[rows], resize_mask_logits(lowres[rows], *sizes), flags)
    # "query" is the row in the logits passed in: map the kept rows back to all queries.
    assert [s | {"query": int(rows[s["query"]])} for s in kept_info] == full_info and len(full_info) > 0
    assert torch.equal(kept, full)
    # A threshold above every probability keeps nothing; semantic and instance read every query.
    assert len(mask_rows("panoptic", logits, 1.0)) == 0
    assert logits[mask_rows("semantic", logits, None)].shape == logits.shape
