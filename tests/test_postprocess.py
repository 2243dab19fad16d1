"""Postprocessing: the synthetic reference case (postproc.npz), stored reference stages, and small
hand-computed inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models import postprocess_openseed
from models.language.tokenizer import BOS_ID, ClipTokenizer
from models.postprocess import (
    caption_from_tokens,
    grounding_scores,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    retrieval_scores,
    select_referring,
    semantic_inference,
)
from models.reference_compare import compare_array, compare_instances, compare_segments_info

BIG = 20.0  # a mask logit whose sigmoid is 1 to float32 precision


@pytest.fixture(scope="module")
def case_dir(reference_root: Path) -> Path:
    return reference_root / "xdecoder_focalt" / "case_a"


@pytest.fixture(scope="module")
def case_json(case_dir: Path) -> dict:
    return json.loads((case_dir / "case.json").read_text())


# ------------------------------------------------------------------------------- reference case


def test_postproc_case_matches_every_output(case_dir: Path, case_json: dict) -> None:
    npz = np.load(case_dir / "postproc.npz")
    task = case_json["tasks"]["postproc"]
    mask_cls = torch.from_numpy(npz["input.mask_cls"])
    thing_flags = [c in task["thing_class_indices"] for c in range(task["num_classes"])]
    masks = resize_mask_logits(
        torch.from_numpy(npz["input.mask_pred_lowres"]),
        padded_hw=tuple(npz["input.padded_size_hw"].tolist()),
        image_hw=tuple(npz["input.image_size_hw"].tolist()),
        output_hw=tuple(npz["input.output_size_hw"].tolist()),
    )
    results = {
        "post.mask_pred_original_size": compare_array("post.mask_pred_original_size", masks, npz, task)
    }
    sem_seg = semantic_inference(mask_cls, masks)
    results["post.sem_seg"] = compare_array("post.sem_seg", sem_seg, npz, task)
    argmax = sem_seg.argmax(dim=0).to(torch.uint8)
    results["post.sem_seg_argmax"] = compare_array("post.sem_seg_argmax", argmax, npz, task)

    panoptic, segments_info = panoptic_inference(mask_cls, masks, thing_flags, **_panoptic_thresholds(task))
    assert panoptic.dtype == torch.int32
    assert compare_segments_info(segments_info, task["panoptic_segments_info"])
    results["post.panoptic_seg"] = compare_array("post.panoptic_seg", panoptic, npz, task)

    instances = instance_inference(
        mask_cls, masks, thing_flags, top_k=task["thresholds"]["test_topk_per_image"]
    )
    assert len(instances["scores"]) == task["panoptic_branch_counts"]["num_instances"]
    results["instances"] = compare_instances(instances, npz, task, task["instance_topk_boundary_gap"])
    failed = {name: r for name, r in results.items() if not r[0]}
    assert not failed, failed


def _panoptic_thresholds(task: dict) -> dict[str, float]:
    return {
        "object_mask_threshold": task["thresholds"]["object_mask_threshold"],
        "overlap_threshold": task["thresholds"]["overlap_threshold"],
    }


def test_grounding_stage_from_stored_arrays(case_dir: Path, case_json: dict) -> None:
    npz = np.load(case_dir / "grounding.npz")
    seg = np.load(case_dir / "seg.npz")
    queries = torch.from_numpy(npz["final.pred_captions"][0, 101:201])
    text = torch.from_numpy(npz["text.class_emb"])
    scores = grounding_scores(queries, text, torch.from_numpy(seg["text.logit_scale"]))
    assert compare_array("grounding.scores", scores, npz, case_json)[0]
    best = select_referring(scores[:, 0], multi=False)
    assert compare_array("grounding.matched_query", np.array(best), npz, case_json)[0]

    logits = resize_mask_logits(
        torch.from_numpy(npz["grounding.selected_mask_lowres"]), (512, 512), (512, 512), (512, 512)
    )
    assert compare_array("grounding.mask_logits", logits, npz, case_json)[0]
    binary = (logits.sigmoid() > 0.5).to(torch.uint8)
    assert compare_array("grounding.mask_binary", binary, npz, case_json)[0]


def test_retrieval_scores_from_stored_embeddings(case_dir: Path, case_json: dict) -> None:
    npz = np.load(case_dir / "retrieval.npz")
    scores = retrieval_scores(
        torch.from_numpy(npz["retrieval.image_embed_decoder"]),
        torch.from_numpy(npz["retrieval.image_embed_backbone"]),
        torch.from_numpy(npz["retrieval.text_embeds"]),
    )
    assert compare_array("retrieval.scores", scores, npz, case_json)[0]
    ranking = scores[0].argsort(descending=True).tolist()
    assert ranking == case_json["tasks"]["retrieval"]["ranking_best_first"]


def test_caption_text_of_reference_tokens(case_json: dict) -> None:
    captioning = case_json["tasks"]["captioning"]
    tokenizer = ClipTokenizer()
    tokens = captioning["final_tokens"]
    assert caption_from_tokens(tokens, tokenizer, cut_at_period=False) == captioning["pred_text"]
    assert caption_from_tokens(torch.tensor(tokens), tokenizer) == captioning["captioning_text"]


# ------------------------------------------------------------------------------- hand-computed


def test_resize_keeps_constants_and_crops() -> None:
    constant = torch.tensor([1.5, -2.0]).view(2, 1, 1).expand(2, 2, 3)
    out = resize_mask_logits(constant, padded_hw=(8, 12), image_hw=(6, 10), output_hw=(5, 7))
    assert out.shape == (2, 5, 7)
    torch.testing.assert_close(out, torch.tensor([1.5, -2.0]).view(2, 1, 1).expand(2, 5, 7))
    # Same size everywhere: the bicubic kernel samples at the pixel centres, so only the crop acts.
    grid = torch.arange(16.0).view(1, 4, 4)
    torch.testing.assert_close(resize_mask_logits(grid, (4, 4), (2, 3), (2, 3)), grid[:, :2, :3])


def test_semantic_inference_by_hand() -> None:
    ln3 = math.log(3.0)
    # Softmax rows: q0 -> [0.5, 0.25 | bg 0.25]; q1 -> [0.2, 0.6 | bg 0.2]. Sigmoids: 0 -> 0.5, ln3 -> 0.75.
    mask_cls = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, ln3, 0.0]])
    mask_pred = torch.tensor([[[0.0, ln3]], [[ln3, 0.0]]])
    expected = torch.tensor(
        [
            [[0.5 * 0.5 + 0.2 * 0.75, 0.5 * 0.75 + 0.2 * 0.5]],
            [[0.25 * 0.5 + 0.6 * 0.75, 0.25 * 0.75 + 0.6 * 0.5]],
        ]
    )
    torch.testing.assert_close(semantic_inference(mask_cls, mask_pred), expected)


def _columns(*cols: int, width: int = 3, height: int = 3) -> torch.Tensor:
    mask = torch.full((height, width), -BIG)
    mask[:, list(cols)] = BIG
    return mask


def test_panoptic_merges_stuff_and_drops_background_and_unsure_queries() -> None:
    # Class 0 is a thing, class 1 stuff; the last logit column is background.
    mask_cls = torch.tensor(
        [
            [5.0, 0.0, 0.0],  # q0: class 0, p = e^5 / (e^5 + 2) = 0.987
            [0.0, 0.0, 6.0],  # q1: confident background -> dropped
            [0.0, 6.0, 0.0],  # q2: class 1, p = 0.995
            [0.0, 5.0, 0.0],  # q3: class 1, p = 0.987 -> merged into q2's segment
            [4.0, 0.0, 0.0],  # q4: class 0, p = 0.965, loses every pixel -> no segment
            [1.0, 0.0, 0.0],  # q5: class 0, p = 0.576 < 0.8 -> dropped
        ]
    )
    mask_pred = torch.stack(
        [_columns(0), _columns(0, 1, 2), _columns(1), _columns(2), _columns(0, 1), _columns(2)]
    )
    panoptic, info = panoptic_inference(mask_cls, mask_pred, thing_flags=[True, False])
    assert panoptic.tolist() == [[1, 2, 2]] * 3
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 0, True), (2, 1, False)]
    assert info[0]["score"] == pytest.approx(math.exp(5) / (math.exp(5) + 2), rel=1e-6)


def test_panoptic_overlap_and_thresholds() -> None:
    # One row of 5 pixels; pixel 4 is covered by no mask and stays void.
    mask_cls = torch.tensor([[6.0, 0.0, 0.0], [5.0, 0.0, 0.0]])  # both class 0: p = 0.995, 0.987
    mask_pred = torch.stack([_columns(0, 1, width=5, height=1), _columns(1, 2, 3, width=5, height=1)])
    # q1 keeps pixels 2 and 3 of its 3: 2/3 < 0.8 -> rejected.
    panoptic, info = panoptic_inference(mask_cls, mask_pred, [True, True])
    assert panoptic.tolist() == [[1, 1, 0, 0, 0]] and len(info) == 1
    panoptic, info = panoptic_inference(mask_cls, mask_pred, [True, True], overlap_threshold=0.5)
    assert panoptic.tolist() == [[1, 1, 2, 2, 0]]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 0, True), (2, 0, True)]
    # p(q0) = 0.9951 < 0.996: nothing is kept.
    panoptic, info = panoptic_inference(mask_cls, mask_pred, [True, True], object_mask_threshold=0.996)
    assert panoptic.tolist() == [[0, 0, 0, 0, 0]] and info == []


def test_instance_inference_by_hand() -> None:
    ln3 = math.log(3.0)
    # Class probabilities (background dropped): q0 [0.5, 0.25], q1 [0.2, 0.6], q2 [0.125, 0.125].
    mask_cls = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, ln3, 0.0], [0.0, 0.0, math.log(6.0)]])
    mask_pred = torch.tensor([[[ln3, -1.0]], [[ln3, 0.0]], [[-1.0, -1.0]]])  # binary: logit > 0
    # Top 3: (q1, c1) 0.6, (q0, c0) 0.5, (q0, c1) 0.25; the mean sigmoid inside each mask is 0.75.
    out = instance_inference(mask_cls, mask_pred, thing_flags=[True, False], top_k=3, panoptic_on=False)
    assert list(zip(out["query_indices"].tolist(), out["labels"].tolist(), strict=True)) == [
        (1, 1),
        (0, 0),
        (0, 1),
    ]
    torch.testing.assert_close(out["scores"], torch.tensor([0.45, 0.375, 0.1875]), rtol=1e-5, atol=0)
    assert out["masks"].dtype == torch.bool and out["masks"][:, 0].tolist() == [[True, False]] * 3
    # With panoptic on, only the thing class 0 survives.
    out = instance_inference(mask_cls, mask_pred, thing_flags=[True, False], top_k=3)
    assert out["query_indices"].tolist() == [0] and out["labels"].tolist() == [0]
    # An empty mask scores 0: q2's masks are all below zero.
    out = instance_inference(mask_cls, mask_pred, thing_flags=[True, True], top_k=6, panoptic_on=False)
    assert out["scores"][out["query_indices"] == 2].tolist() == [0.0, 0.0]


def test_grounding_scores_and_selection_by_hand() -> None:
    queries = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    text = torch.tensor([0.0, 2.0])
    # Cosines 0.8, 0, -1; exp(log 10) = 10; exp(log 1000) is clamped to 100.
    torch.testing.assert_close(
        grounding_scores(queries, text, math.log(10.0)), torch.tensor([8.0, 0.0, -10.0])
    )
    torch.testing.assert_close(
        grounding_scores(queries, text, torch.tensor(math.log(1000.0))), torch.tensor([80.0, 0.0, -100.0])
    )
    assert grounding_scores(queries, text.view(1, 2), 0.0).shape == (3, 1)

    scores = torch.tensor([0.1, 0.7, 0.3, 0.7])
    assert select_referring(scores, multi=False) == [1]
    assert select_referring(scores, multi=True, threshold=0.2) == [1, 3, 2]
    assert select_referring(scores, multi=True, threshold=0.9) == []


def test_caption_cuts_by_hand() -> None:
    tokenizer = ClipTokenizer()
    ids, mask = tokenizer.encode(["a dog. on grass"], context_length=12)
    ids[0, mask[0] == 0] = BOS_ID  # greedy decoding leaves the start token after the end
    assert caption_from_tokens(ids[0], tokenizer, cut_at_period=False) == "a dog. on grass"
    assert caption_from_tokens(ids[0], tokenizer) == "a dog"


def test_retrieval_scores_by_hand() -> None:
    decoder = torch.tensor([[1.0, 0.0]])
    backbone = torch.tensor([[0.0, 2.0]])
    texts = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    half_sqrt2 = math.sqrt(0.5)
    expected = torch.tensor([[0.5, 0.5, half_sqrt2]])
    torch.testing.assert_close(retrieval_scores(decoder, backbone, texts), expected)


def test_panoptic_segments_name_the_query_that_opened_them():
    """X-Decoder and OpenSeeD panoptic segments carry the row of their query in the logits passed in
    (OpenSeeD keeps a subset first), so a box head's box can be attached to a thing segment."""
    masks = torch.full((4, 8, 8), -10.0)
    for q, (r0, r1) in enumerate([(0, 2), (2, 4), (4, 6), (6, 8)]):
        masks[q, r0:r1] = 10.0  # four disjoint stripes
    # OpenSeeD: sigmoid scores; query 0 stays below the 0.25 object threshold.
    sigmoid_logits = torch.tensor([[-5.0, -5.0], [4.0, -4.0], [-4.0, 4.0], [4.0, -4.0]])
    _, info = postprocess_openseed.panoptic_inference(sigmoid_logits, masks, [True, False])
    assert [(s["category_id"], s["query"]) for s in info] == [(0, 1), (1, 2), (0, 3)]
    # X-Decoder: softmax with a background column; query 2 is background.
    softmax_logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])
    _, info = panoptic_inference(softmax_logits, masks, [True, True])
    assert [(s["category_id"], s["query"]) for s in info] == [(0, 0), (1, 1), (0, 3)]
