"""Referring phrases, training examples and caption parsing of the ShapesWorld demo data."""

from __future__ import annotations

import numpy as np
import pytest

from models.configs import get_config
from models.demo.data import make_example, thing_vocabulary
from models.demo.evaluate import parse_caption
from models.demo.phrases import FORMS, perturbed_caption, sample_phrase, scene_mentions
from models.demo.shapesworld import HELD_OUT, SHAPES, THING_COLOURS, Scene, render_scene


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(7)
    return [render_scene(rng) for _ in range(40)]


def centre(scene: Scene, i: int) -> tuple[float, float]:
    return scene.things[i].centre


def test_phrase_targets_follow_their_form(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for scene in scenes:
        for form in FORMS:
            phrase = sample_phrase(rng, scene, form=form)
            seen.add(phrase.form)
            things = scene.things
            if phrase.form == "absent":
                colour, shape = phrase.text.split()[1:]
                assert phrase.targets == []
                assert all((t.colour, t.shape) != (colour, shape) for t in things)
            elif phrase.form == "all":
                word = phrase.text.split()[1]
                expected = [i for i, t in enumerate(things) if word in (t.colour, t.shape)]
                assert phrase.targets == expected and expected
            elif phrase.form == "extreme":
                side = phrase.text.split()[-1]
                (target,) = phrase.targets
                words = phrase.text.removeprefix("the ").split(" on the ")[0].split()
                same = [i for i, t in enumerate(things) if {t.shape, t.colour, t.size_word} >= set(words)]
                assert target in same and len(same) >= 2
                axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[side]
                assert sign * centre(scene, target)[axis] == min(sign * centre(scene, i)[axis] for i in same)
            elif phrase.form == "relation":
                (target,) = phrase.targets
                assert things[target].shape in phrase.text.split(" left of ")[0].split(" right of ")[0]
            else:
                assert len(phrase.targets) == 1
                assert things[phrase.targets[0]].shape in phrase.text
    assert {"single", "all", "absent"} <= seen


def test_training_phrases_and_negatives_never_name_held_out(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(1)
    held = [f"{c} {s}" for c, s in HELD_OUT]
    for scene in scenes:
        for _ in range(5):
            text = sample_phrase(rng, scene).text
            assert not any(h in text for h in held), text
        negative = perturbed_caption(rng, scene)
        assert negative != scene.caption
        assert not any(h in negative for h in held), negative


def test_shape_contrast_phrases_keep_a_present_colour_on_an_absent_combination(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(2)
    contrasts = 0
    for scene in scenes:
        phrase = sample_phrase(rng, scene, form="absent", shape_contrast_share=1.0)
        if phrase.form != "absent":  # every combination in a present colour is present or held out
            continue
        colour, shape = phrase.text.split()[1:]
        assert phrase.targets == []
        assert (colour, shape) not in HELD_OUT
        assert all((t.colour, t.shape) != (colour, shape) for t in scene.things)
        assert colour in {t.colour for t in scene.things}
        contrasts += 1
    assert contrasts >= len(scenes) // 2


def test_training_vocabulary_names_every_shape_contrast(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(4)
    for scene in scenes:
        vocabulary = thing_vocabulary(False, rng, scene, allow_held_out=False)
        present = {t.name for t in scene.things}
        assert present <= set(vocabulary) and len(set(vocabulary)) == len(vocabulary)
        for colour in {t.colour for t in scene.things}:
            for shape in SHAPES:
                if (colour, shape) not in HELD_OUT:
                    assert f"{colour} {shape}" in vocabulary
        assert not any(f"{c} {s}" in vocabulary for c, s in HELD_OUT)
        assert all(name.split()[0] in THING_COLOURS for name in vocabulary)
        by_shape = thing_vocabulary(True, rng, scene, allow_held_out=False)
        assert set(by_shape) <= set(SHAPES) and {t.shape for t in scene.things} <= set(by_shape)


def test_example_targets_cover_the_image() -> None:
    rule = get_config("demo").resize["segmentation"]
    example = make_example(np.random.default_rng(3), rule)
    h, w = example.size
    assert example.image.shape == (3, h, w)
    assert min(h, w) >= int(192 * rule.scale) and max(h, w) <= int(448 * rule.scale + 0.5)
    assert example.masks.shape[1:] == (h, w)
    # things and stuff partition the image: soft masks sum to one everywhere
    np.testing.assert_allclose(example.masks.sum(0).numpy(), 1.0, atol=1e-5)
    assert int(example.labels.max()) < len(example.vocabulary)
    assert example.phrase_masks.shape[0] == len(example.phrase.targets)
    assert "background" not in example.vocabulary


def test_parse_caption_reads_back_the_truth(scenes: list[Scene]) -> None:
    for scene in scenes:
        assert parse_caption(scene.caption) == scene_mentions(scene)


def test_drawn_forms_keep_their_share_where_the_scene_hosts_them() -> None:
    """A form that fits few scenes is not crowded out: half the draws ask for the side form, so about
    half the phrases of scenes with two things of one shape (where it can fit) are of that form."""
    rng = np.random.default_rng(5)
    hosting, extreme = 0, 0
    while hosting < 300:
        scene = render_scene(rng)
        shapes = [t.shape for t in scene.things]
        if len(set(shapes)) == len(shapes):
            continue
        hosting += 1
        extreme += sample_phrase(rng, scene, weights=(0.5, 0.5, 0.0, 0.0, 0.0)).form == "extreme"
    assert 0.42 <= extreme / hosting <= 0.58, extreme / hosting
