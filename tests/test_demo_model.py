"""The shipped demo weights: loaded by default, small, and scoring well on fresh ShapesWorld images.

A small seeded set (24 images, one 24-image retrieval gallery) keeps this fast; `openset eval-demo`
runs the full evaluation (100 images, 100-image galleries). The bars below are the targets of the
issue, which the shipped model meets on this small set too (see models/demo/README.md for the full
scores); an untrained model scores near zero on every one of them but the empty answers.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.demo.evaluate import SINGLE_FORM_SCORES, EvalSettings, evaluate
from models.predictor import DEMO_WEIGHTS, Predictor

# The targets (the stuff F1 bar is the project's own: the issue scores all mentions together),
# with the shipped model's score on this set and the untrained model's (in brackets).
BARS = {
    "seg_miou_seen": 0.85,  # target, 0.907 on this set [0.03]
    "seg_miou_held_out": 0.60,  # target, 0.912 on this set [0.0]
    "refer_miou_single": 0.70,  # target, 0.710 on this set [0.05]
    "refer_empty_share": 0.80,  # target; 23 of the 24 absent phrases get the empty answer (0.958)
    # [1.0: untrained scores never pass 0.5]
    "caption_mention_f1": 0.80,  # target, 0.881 on this set [0.0]
    "caption_stuff_f1": 0.90,  # 1.0 on this set [0.0]
    "retrieval_r1": 0.70,  # target, 1.0 on this set [0.04]
}


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_config("demo")


def test_shipped_weights_are_loaded_by_default(predictor: Predictor) -> None:
    assert DEMO_WEIGHTS.is_file()
    assert DEMO_WEIGHTS.stat().st_size <= 20 * 2**20
    assert not predictor.model_id.endswith("untrained-seed0")
    assert predictor.model.cfg.pixel_decoder.name == "transformer_encoder_deform"


@pytest.mark.slow
def test_shipped_weights_reach_the_bars(predictor: Predictor) -> None:
    settings = EvalSettings(num_images=24, galleries=1, gallery_size=24, seed=11, batch_size=8)
    scores = evaluate(predictor, settings)
    missed = {k: round(scores[k], 3) for k, bar in BARS.items() if not scores[k] >= bar}
    assert not missed, f"below the bar: {missed} (bars {BARS})"
    assert np.isfinite(scores["panoptic_quality"]) and scores["panoptic_quality"] > 0.3
    # the per-form referring scores split the single-target phrases between them
    counts = {name: scores[f"{name}_phrases"] for name in SINGLE_FORM_SCORES.values()}
    assert all(n > 0 for n in counts.values())
    weighted = sum(scores[name] * n for name, n in counts.items()) / sum(counts.values())
    assert weighted == pytest.approx(scores["refer_miou_single"])
