"""Referring phrases of ShapesWorld with their exact target sets, and caption perturbations.

A phrase names things by a description (optional size word, optional colour, a shape or "shape")
and a form:

    the <desc>                      exactly one thing fits              -> that thing
    the <desc> on the left|right|top|bottom   two or more fit           -> the extreme one by centre
    the <desc> left of|right of the <desc2>   both unique, relation holds -> the first
    all <colour> shapes | every <shape>       one or more fit           -> all of them
    the <colour> <shape>            no thing of that kind is present    -> nothing (empty answer)

`sample_phrase(rng, scene, ...)` draws one phrase of a random form that fits the scene; phrases never
name a held-out combination unless asked to (evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.demo.shapesworld import HELD_OUT, SHAPES, THING_COLOURS, Scene, Thing

SIDES = ("left", "right", "top", "bottom")
FORMS = ("single", "extreme", "relation", "all", "absent")


@dataclass(frozen=True)
class Description:
    """Which things a phrase names: any field left None matches every thing."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, thing: Thing) -> bool:
        return (
            (self.shape is None or thing.shape == self.shape)
            and (self.colour is None or thing.colour == self.colour)
            and (self.size is None or thing.size_word == self.size)
        )

    def text(self) -> str:
        words = [w for w in (self.size, self.colour, self.shape or "shape") if w]
        return " ".join(words)


@dataclass
class Phrase:
    """A referring phrase and the indices (into `scene.things`) of its targets; empty = no target."""

    text: str
    targets: list[int]
    form: str


def _fits(scene: Scene, desc: Description) -> list[int]:
    return [i for i, t in enumerate(scene.things) if desc.matches(t)]


def _names_held_out(desc: Description) -> bool:
    return (desc.colour, desc.shape) in HELD_OUT


def _describe(rng: np.random.Generator, thing: Thing) -> Description:
    """A random description that fits `thing`: its shape always, colour and size word sometimes."""
    colour = thing.colour if rng.random() < 0.75 else None
    size = thing.size_word if thing.size_word and rng.random() < 0.4 else None
    return Description(shape=thing.shape, colour=colour, size=size)


def _extreme(scene: Scene, indices: list[int], side: str) -> int:
    key = {
        "left": lambda i: scene.things[i].centre[0],
        "right": lambda i: -scene.things[i].centre[0],
        "top": lambda i: scene.things[i].centre[1],
        "bottom": lambda i: -scene.things[i].centre[1],
    }[side]
    return min(indices, key=key)


def _try_form(
    rng: np.random.Generator, scene: Scene, form: str, allow_held_out: bool, shape_contrast_share: float
) -> Phrase | None:
    things = scene.things
    if form == "absent":
        present = {(t.colour, t.shape) for t in things}
        colours = list(THING_COLOURS)
        pair = (colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])
        if rng.random() < shape_contrast_share:  # a colour that is present, on another shape
            pair = (things[rng.integers(len(things))].colour, pair[1])
        if pair in present or (pair in HELD_OUT and not allow_held_out):
            return None
        return Phrase(f"the {pair[0]} {pair[1]}", [], form)
    if form == "all":
        if rng.random() < 0.5:
            colour = things[rng.integers(len(things))].colour
            desc, text = Description(colour=colour), f"all {colour} shapes"
        else:
            shape = things[rng.integers(len(things))].shape
            desc, text = Description(shape=shape), f"every {shape}"
        return Phrase(text, _fits(scene, desc), form)
    desc = _describe(rng, things[rng.integers(len(things))])
    if _names_held_out(desc) and not allow_held_out:
        return None
    fits = _fits(scene, desc)
    if form == "single":
        return Phrase(f"the {desc.text()}", fits, form) if len(fits) == 1 else None
    if form == "extreme":
        if len(fits) < 2:
            return None
        side = SIDES[rng.integers(len(SIDES))]
        return Phrase(f"the {desc.text()} on the {side}", [_extreme(scene, fits, side)], form)
    # relation: both descriptions unique, the first left (or right) of the second
    other = _describe(rng, things[rng.integers(len(things))])
    if (_names_held_out(other) and not allow_held_out) or len(fits) != 1:
        return None
    anchors = _fits(scene, other)
    if len(anchors) != 1 or anchors[0] == fits[0]:
        return None
    dx = things[fits[0]].centre[0] - things[anchors[0]].centre[0]
    relation = "left of" if dx < 0 else "right of"
    return Phrase(f"the {desc.text()} {relation} the {other.text()}", fits, form)


def sample_phrase(
    rng: np.random.Generator,
    scene: Scene,
    weights: tuple[float, ...] = (0.4, 0.15, 0.1, 0.15, 0.2),
    allow_held_out: bool = False,
    form: str | None = None,
    shape_contrast_share: float = 0.0,
) -> Phrase:
    """One phrase for `scene`; the form is drawn once with `weights` (in `FORMS` order) unless given.
    Falls back to a single-target or an absent phrase when the drawn form does not fit the scene.

    `shape_contrast_share`: the share of absent phrases that take the colour of a thing present and
    name another shape ("the red star" next to a red circle), so that only the shape tells them apart
    (training uses it; the evaluation draws absent combinations uniformly)."""
    p = np.asarray(weights) / np.sum(weights)
    # The form is drawn once and retried with new descriptions, so that the forms come in the shares
    # of `weights`: drawing it again on every miss would favour the forms that fit most scenes.
    chosen = form or FORMS[rng.choice(len(FORMS), p=p)]
    for _ in range(50):
        phrase = _try_form(rng, scene, chosen, allow_held_out, shape_contrast_share)
        if phrase is not None:
            return phrase
    for fallback in ("single", "absent"):
        for _ in range(50):
            phrase = _try_form(rng, scene, fallback, allow_held_out, shape_contrast_share)
            if phrase is not None:
                return phrase
    # every thing is ambiguous and every combination present: "all <colour> shapes" always fits
    return Phrase(
        f"all {scene.things[0].colour} shapes",
        _fits(scene, Description(colour=scene.things[0].colour)),
        "all",
    )


def caption_of(mentions: list[tuple[str | None, str, str]], stuff: list[str]) -> str:
    """The caption pattern from (size word, colour, shape) mentions left to right and the stuff
    names (one, or top then bottom)."""
    words = ["a " + " ".join(w for w in m if w) for m in mentions]
    things = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if len(stuff) == 1:
        return f"{things} on {stuff[0]}"
    return f"{things} on {stuff[1]} under {stuff[0]}"


def scene_mentions(scene: Scene) -> tuple[list[tuple[str | None, str, str]], list[str]]:
    """(size, colour, shape) of the things left to right, and stuff names (full, or top then bottom)."""
    things = sorted(scene.things, key=lambda t: t.centre[0])
    mentions = [(t.size_word, t.colour, t.shape) for t in things]
    order = {"full": 0, "top": 0, "bottom": 1}
    stuff = [s.name for s in sorted(scene.stuff, key=lambda s: order[s.position])]
    return mentions, stuff


def perturbed_caption(rng: np.random.Generator, scene: Scene, allow_held_out: bool = False) -> str:
    """A caption of a slightly different scene (one colour, shape, size word or stuff changed, or
    two things swapped): a hard negative for retrieval. Never the true caption."""
    truth = scene.caption
    mentions, stuff = scene_mentions(scene)
    for _ in range(100):
        m, s = [list(x) for x in mentions], list(stuff)
        kind = rng.integers(5)
        i = int(rng.integers(len(m)))
        if kind == 0:
            m[i][1] = list(THING_COLOURS)[rng.integers(len(THING_COLOURS))]
        elif kind == 1:
            m[i][2] = SHAPES[rng.integers(len(SHAPES))]
        elif kind == 2:
            m[i][0] = [None, "small", "large"][rng.integers(3)]
        elif kind == 3:
            names = ["sky", "grass", "sand", "water", "wall"]
            j = int(rng.integers(len(s)))
            s[j] = names[rng.integers(len(names))]
            if len(s) == 2 and (s[0] == s[1] or s[1] == "sky"):
                continue
        elif len(m) >= 2:
            j = int(rng.integers(len(m)))
            m[i], m[j] = m[j], m[i]
        if not allow_held_out and any((c, sh) in HELD_OUT for _, c, sh in m):
            continue
        text = caption_of([tuple(x) for x in m], s)
        if text != truth:
            return text
    return truth + " and a small red circle"
