"""OpenSeeD: parity with the official outputs (golden case A through `models.reference_check`), the
official key layout with its tied aliases, and the postprocessing formulas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError, check_state_dict, reference_checkpoint
from models.decoders.openseed import (
    OpenSeeDDecoder,
    OpenSeeDDecoderConfig,
    box_sine_embedding,
    inverse_sigmoid,
)
from models.language.text_encoder import TextEncoderConfig
from models.openseed import OpenSeeDModel, get_openseed_config
from models.postprocess_openseed import (
    boxes_to_original,
    detection_inference,
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from models.reference_check_openseed import query_alignment
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def model() -> OpenSeeDModel:
    return OpenSeeDModel(get_openseed_config("openseed-swint")).eval()


def test_state_dict_is_the_official_key_set(model: OpenSeeDModel, reference_root: Path) -> None:
    """Every parameter of the manifest, aliases included, with its shape; only the rebuilt Swin
    index tables and the loss buffer are absent."""
    entries = json.loads((reference_root / "openseed_swint" / "keys.json").read_text())["entries"]
    official = {e["key"]: tuple(e["shape"]) for e in entries if e["kind"] == "parameter"}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    assert len(ours) == 780


def test_aliases_are_one_module(model: OpenSeeDModel) -> None:
    decoder = model.decoder
    assert decoder.decoder.norm is decoder.decoder_norm
    heads = [decoder._bbox_embed, *decoder.bbox_embed, *decoder.decoder.bbox_embed]
    assert len(heads) == 19 and all(h is decoder._bbox_embed for h in heads)


def test_checkpoint_with_differing_alias_is_refused(model: OpenSeeDModel) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_state_dict(model, state)  # consistent aliases load
    state["sem_seg_head.predictor.bbox_embed.3.layers.2.bias"] += 1.0
    with pytest.raises(CheckpointError, match="tied keys with different values"):
        check_state_dict(model, state)


def test_box_mapping_to_original_pixels() -> None:
    """cxcywh of the padded input -> xyxy original pixels, scaled by (W0 Wp / W, H0 Hp / H), unclipped."""
    boxes = torch.tensor([[0.5, 0.25, 0.5, 0.1], [0.0, 1.0, 0.2, 0.4]])
    # original 300 x 400 (H0, W0), resized 600 x 800, padded 608 x 800
    out = boxes_to_original(boxes, padded_hw=(608, 800), image_hw=(600, 800), output_hw=(300, 400))
    sx, sy = 400 * 800 / 800, 300 * 608 / 600
    expected = torch.tensor(
        [[0.25 * sx, 0.2 * sy, 0.75 * sx, 0.3 * sy], [-0.1 * sx, 0.8 * sy, 0.1 * sx, 1.2 * sy]]
    )
    torch.testing.assert_close(out, expected)


def test_inverse_sigmoid_and_box_sine_embedding() -> None:
    x = torch.tensor([0.0, 0.5, 0.9, 1.2])
    torch.testing.assert_close(
        inverse_sigmoid(x), torch.tensor([-11.512915, 0.0, 2.1972246, 11.512915]), rtol=1e-5, atol=1e-5
    )
    emb = box_sine_embedding(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), num_feats=4)
    # order (y, x, w, h); channel 0 is sin(2 pi v), channel 1 cos(2 pi v)
    two_pi = 2 * torch.pi
    assert emb.shape == (1, 16)
    torch.testing.assert_close(emb[0, 0], torch.sin(torch.tensor(0.2 * two_pi)))
    torch.testing.assert_close(emb[0, 5], torch.cos(torch.tensor(0.1 * two_pi)))
    torch.testing.assert_close(emb[0, 12], torch.sin(torch.tensor(0.4 * two_pi)))


def test_query_selection_depends_on_the_vocabulary() -> None:
    """Two-stage selection: class embeddings change which proposals become queries."""
    torch.manual_seed(0)
    cfg = OpenSeeDDecoderConfig(
        hidden_dim=32, num_queries=20, num_layers=2, num_heads=4, dim_feedforward=64, mask_dim=32
    )
    text = TextEncoderConfig(width=32, layers=1, heads=4, context_length=8, projection_dim=16)
    decoder = OpenSeeDDecoder(cfg, text).eval()
    levels = [torch.randn(1, 32, s, s) for s in (16, 8, 4, 2)]
    mask_features = torch.randn(1, 32, 32, 32)
    vocab_a = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    vocab_b = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    with torch.inference_mode():
        rec_a: dict = {}
        out_a = decoder(levels, mask_features, vocab_a, record=rec_a)
        rec_b: dict = {}
        decoder(levels, mask_features, vocab_b, record=rec_b)
        out_perm = decoder(levels, mask_features, vocab_a[[2, 0, 1]])
        out_nomask = decoder(levels, mask_features, vocab_a, masks=False)
    assert out_a.pred_logits.shape == (1, 20, 3) and out_a.pred_boxes.shape == (1, 20, 4)
    assert out_a.pred_masks.shape == (1, 20, 32, 32) and out_nomask.pred_masks is None
    assert set(rec_a["decoder.topk_proposals"][0].tolist()) != set(
        rec_b["decoder.topk_proposals"][0].tolist()
    )
    # the 2x2 (1/64 in the decoder's first place) level has proposals of size 0.05: all valid;
    # reordering the vocabulary reorders the logit columns only
    torch.testing.assert_close(out_perm.pred_logits, out_a.pred_logits[..., [2, 0, 1]])
    assert bool(((out_a.pred_boxes > 0) & (out_a.pred_boxes < 1)).all())


def test_batched_images_decode_like_single_ones() -> None:
    """Queries are selected per image: a batch of two gives each image's own outputs."""
    torch.manual_seed(1)
    cfg = OpenSeeDDecoderConfig(
        hidden_dim=32, num_queries=10, num_layers=2, num_heads=4, dim_feedforward=64, mask_dim=32
    )
    text = TextEncoderConfig(width=32, layers=1, heads=4, context_length=8, projection_dim=16)
    decoder = OpenSeeDDecoder(cfg, text).eval()
    levels = [torch.randn(2, 32, s, 2 * s) for s in (8, 4, 2, 1)]  # encoder order, fine first
    mask_features = torch.randn(2, 32, 16, 32)
    vocab = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    with torch.inference_mode():
        both = decoder(levels, mask_features, vocab)
        for i in range(2):
            one = decoder([x[i : i + 1] for x in levels], mask_features[i : i + 1], vocab)
            torch.testing.assert_close(one.pred_logits[0], both.pred_logits[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(one.pred_boxes[0], both.pred_boxes[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(one.pred_masks[0], both.pred_masks[i], rtol=1e-4, atol=1e-4)


def test_postprocess_uses_sigmoid_then_temperature() -> None:
    logits = torch.tensor([[3.0, -3.0], [-4.0, -2.0], [0.0, 2.5]])  # σ max: 0.95, 0.12, 0.92
    masks = torch.full((3, 4, 4), -6.0)
    masks[0, :2] = 6.0
    masks[2, 2:] = 6.0
    probs = torch.softmax(logits.sigmoid() / 0.06, dim=-1)
    sem = semantic_inference(logits, masks)
    torch.testing.assert_close(sem, torch.einsum("qc,qhw->chw", probs, masks.sigmoid()))
    pan, info = panoptic_inference(logits, masks, thing_flags=[True, False])
    # query 1 is dropped by the σ threshold 0.25; scores are the sharpened probabilities
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 0, True), (2, 1, False)]
    assert info[0]["score"] == pytest.approx(float(probs[0].max()), rel=1e-5)
    assert pan[:2].eq(1).all() and pan[2:].eq(2).all()
    boxes = torch.arange(12, dtype=torch.float32).view(3, 4)
    inst = instance_inference(logits, masks, boxes, thing_flags=[True, False], top_k=3)
    # top-3 pairs (0, 0), (2, 1), (2, 0); the stuff class 1 is dropped
    assert inst["labels"].tolist() == [0, 0] and inst["query_indices"].tolist() == [0, 2]
    assert inst["boxes"].tolist() == [boxes[0].tolist(), boxes[2].tolist()]
    inside = torch.sigmoid(torch.tensor(6.0))
    assert float(inst["scores"][0]) == pytest.approx(float(logits[0, 0].sigmoid() * inside), rel=1e-5)
    det = detection_inference(logits, boxes, top_k=3)
    assert list(zip(det["query_indices"].tolist(), det["labels"].tolist(), strict=True)) == [
        (0, 0),
        (2, 1),
        (2, 0),
    ]


@pytest.mark.slow
def test_golden_case_a(reference_root: Path, cache_dir: Path) -> None:
    """Every array of case A within the README bounds, the panoptic segments and the instance and
    detection sets; run as a user runs it, in a fresh process (about 470 MB of weights)."""
    case = reference_root / "openseed_swint" / "case_a"
    checkpoint = reference_checkpoint(case.parent / "keys.json", cache_dir)
    result = subprocess.run(
        [sys.executable, "-m", "models.reference_check", str(case), "--checkpoint", str(checkpoint)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    lines = [line for line in result.stdout.splitlines() if line.endswith(("PASS", "FAIL"))]
    failed = [line for line in lines if line.endswith("FAIL")]
    assert not failed, "\n".join(failed)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (
        "backbone.res2",
        "encoder.memory",
        "decoder.topk_proposals",
        "decoder.enc_class_logits",
        "out.pred_masks",
        "post.sem_seg",
        "post.panoptic segments_info",
        "post.panoptic_overlap0.0 segments_info",
        "post.inst:masks",
        "det:boxes_xyxy",
    ):
        assert any(line.startswith(name + " ") for line in lines), name
    assert len(lines) >= 70


def test_query_alignment_allows_only_near_tied_swaps() -> None:
    ref = np.array([[3, 5, 9]])
    scores = np.array([[1.0, 1.0 - 5e-6, 0.5]])
    row, perm = query_alignment(np.array([[5, 3, 9]]), ref, scores)
    assert row[1] and perm.tolist() == [1, 0, 2]
    row, _ = query_alignment(np.array([[9, 5, 3]]), ref, scores)  # 3 and 9 differ by 0.5: not a tie
    assert not row[1]
    row, perm = query_alignment(np.array([[3, 5, 7]]), ref, scores)
    assert not row[1] and perm is None
