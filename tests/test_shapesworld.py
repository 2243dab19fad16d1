"""The ShapesWorld renderer follows its specification."""

from __future__ import annotations

import re

import numpy as np
import pytest

from models.demo.shapesworld import (
    HELD_OUT,
    STUFF_COLOURS,
    THING_COLOURS,
    Scene,
    points_in_polygon,
    rasterise,
    render_scene,
)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(1234)
    return [render_scene(rng) for _ in range(60)]


def test_image_sizes_and_counts(scenes: list[Scene]) -> None:
    for scene in scenes:
        height, width, channels = scene.image.shape
        assert channels == 3 and scene.image.dtype == np.uint8
        assert 192 <= height <= 448 and 192 <= width <= 448
        assert 1 <= len(scene.things) <= 5


def test_things_are_flat_coloured_and_sized(scenes: list[Scene]) -> None:
    for scene in scenes:
        height, width = scene.image.shape[:2]
        for thing in scene.things:
            pixels = scene.image[thing.mask]
            assert (pixels == np.asarray(THING_COLOURS[thing.colour])).all()
            assert 12 <= thing.radius <= min(width, height) / 4
            ys, xs = np.nonzero(thing.mask)
            assert xs.min() >= 0 and xs.max() < width and ys.min() >= 0 and ys.max() < height


def test_visibility_rule(scenes: list[Scene]) -> None:
    for scene in scenes:
        for thing in scene.things:
            assert thing.mask.sum() >= 0.6 * thing.area > 0


def test_stuff_noise_and_layout(scenes: list[Scene]) -> None:
    saw_split = saw_full = False
    for scene in scenes:
        covered = np.zeros(scene.image.shape[:2], dtype=bool)
        for region in scene.stuff:
            diff = scene.image[region.mask].astype(int) - np.asarray(STUFF_COLOURS[region.name])
            base = np.asarray(STUFF_COLOURS[region.name])
            # Noise is within +-20 except where clipping at 0 or 255 moved it.
            clipped = (scene.image[region.mask] == 0) | (scene.image[region.mask] == 255)
            assert (np.abs(diff)[~clipped] <= 20).all()
            assert np.abs(diff.mean(axis=0)).max() < 3 or region.mask.sum() < 500, base
            covered |= region.mask
        for thing in scene.things:
            covered |= thing.mask
        assert covered.all(), "every pixel belongs to a thing or a stuff region"
        if len(scene.stuff) == 2:
            saw_split = True
            top, bottom = scene.stuff
            assert top.position == "top" and bottom.position == "bottom"
            assert top.name != bottom.name and bottom.name != "sky"
        else:
            saw_full = True
    assert saw_split and saw_full


def test_held_out_combinations_never_in_training_scenes() -> None:
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(150):
        scene = render_scene(rng)
        seen |= {(t.colour, t.shape) for t in scene.things}
    assert not seen & HELD_OUT
    assert {c for c, _ in seen} == set(THING_COLOURS)


def test_held_out_combinations_appear_when_allowed() -> None:
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(150):
        seen |= {(t.colour, t.shape) for t in render_scene(rng, allow_held_out=True).things}
    assert seen & HELD_OUT


def test_caption_follows_the_pattern(scenes: list[Scene]) -> None:
    colour = r"(?:red|blue|yellow|purple|orange|white|black)"
    mention = rf"a (?:(?:small|large) )?{colour} (?:circle|square|triangle|star)"
    stuff = r"(?:sky|grass|sand|water|wall)"
    pattern = re.compile(rf"^{mention}(?:, {mention})*(?: and {mention})? on {stuff}(?: under {stuff})?$")
    for scene in scenes:
        caption = scene.caption
        assert pattern.match(caption), caption
        assert caption.count(" a ") + caption.startswith("a ") == len(scene.things)
    two = [s for s in scenes if len(s.stuff) == 2][0]
    assert two.caption.endswith(f"on {two.stuff[1].name} under {two.stuff[0].name}")


def test_caption_orders_things_left_to_right(scenes: list[Scene]) -> None:
    for scene in scenes:
        names = re.findall(r"(\w+ (?:circle|square|triangle|star))", scene.caption)
        ordered = sorted(scene.things, key=lambda t: t.centre[0])
        assert [n.split()[-2:] for n in names] == [[t.colour, t.shape] for t in ordered]


def test_size_words() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        for thing in render_scene(rng).things:
            expected = "small" if thing.radius < 28 else "large" if thing.radius > 48 else None
            assert thing.size_word == expected


def test_rasterised_areas_match_geometry() -> None:
    hw = (200, 200)
    circle = rasterise("circle", (100.0, 100.0), 40.0, 0.0, hw).sum()
    assert abs(circle - np.pi * 40**2) / (np.pi * 40**2) < 0.01
    square = rasterise("square", (100.0, 100.0), 30.0, 17.0, hw).sum()
    assert abs(square - 60**2) / 60**2 < 0.02
    triangle = rasterise("triangle", (100.0, 100.0), 40.0, 0.0, hw).sum()
    expected = 3 * np.sqrt(3) / 4 * 40**2
    assert abs(triangle - expected) / expected < 0.02


def test_points_in_polygon_unit_square() -> None:
    square = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]])
    xs = np.array([1.0, 3.0, -0.5, 1.5])
    ys = np.array([1.0, 1.0, 1.0, 1.9])
    assert points_in_polygon(xs, ys, square).tolist() == [True, False, False, True]
