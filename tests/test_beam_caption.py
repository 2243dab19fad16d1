"""Beam-search captions (models.beam_caption): the cached steps follow their hypotheses, so each
candidate's log-probability equals that of an uncached full pass over its ids; one beam is greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.beam_caption import beam_caption
from models.decoders.caption_reference import caption_logits_full_pass
from models.demo.shapesworld import render_scene
from models.language.tokenizer import BOS_ID, EOS_ID, PERIOD_ID
from models.postprocess import caption_from_tokens
from models.predictor import CAPTION_STEPS, Predictor

END_IDS = {EOS_ID, PERIOD_ID}


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_config("demo")


def scene_images(count: int, seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render_scene(rng).image for _ in range(count)]


def test_candidate_log_probs_equal_full_passes(predictor: Predictor) -> None:
    """Padded batch of two images, 4 beams: every candidate's summed log-probability, recomputed by
    the official full pass without caches, matches; candidates come best first and end the caption."""
    model, beams = predictor.model, 4
    images = scene_images(2)
    with torch.inference_mode():
        _, features = predictor._encode(images, "captioning")
        assert features.memory.regions is not None  # the batch pads one of the two images
        found = beam_caption(model, features, beams, CAPTION_STEPS, END_IDS)
        assert [len(candidates) for candidates in found] == [beams, beams]
        for j in range(beams):
            rows = [candidates[j].ids for candidates in found]
            length = max(len(ids) for ids in rows)
            tokens = torch.tensor([ids + [BOS_ID] * (length - len(ids)) for ids in rows])
            log_probs = caption_logits_full_pass(model, features.memory, tokens).float().log_softmax(-1)
            for i, ids in enumerate(rows):
                steps = torch.arange(len(ids) - 1)
                expected = log_probs[i, steps, torch.tensor(ids[1:])].sum()
                assert found[i][j].log_prob == pytest.approx(float(expected), abs=2e-3)
    for candidates in found:
        assert [c.log_prob for c in candidates] == sorted((c.log_prob for c in candidates), reverse=True)
        assert all(c.ids[0] == BOS_ID and c.ids[-1] in END_IDS for c in candidates)
        assert len({tuple(c.ids) for c in candidates}) == beams  # distinct hypotheses


def test_one_beam_is_greedy(predictor: Predictor) -> None:
    images = scene_images(3, seed=6)
    _, features = predictor._encode(images, "captioning")
    found = beam_caption(predictor.model, features, 1, CAPTION_STEPS, END_IDS)
    texts = [caption_from_tokens(candidates[0].ids, predictor.tokenizer) for candidates in found]
    assert texts == predictor.caption(images)


def test_beam_captions_through_the_predictor(predictor: Predictor) -> None:
    images = scene_images(2, seed=7)
    captions = predictor.caption(images, beams=4)
    assert len(captions) == 2 and all(caption.strip() for caption in captions)
    assert captions == [predictor.caption([image], beams=4)[0] for image in images]  # batching-free
    with pytest.raises(ValueError, match="beams must be at least 1"):
        predictor.caption(images, beams=0)
