"""ShapesWorld v1: procedurally drawn images with exact ground truth for every task.

A scene is one or two stuff regions (sky, grass, sand, water, wall) with one to five flat-coloured
shapes (circle, square, triangle, star) drawn on top. `render_scene` returns the image together with
the visible mask of every shape and stuff region and the scene's caption, so segmentation, referring,
captioning and retrieval can all be trained and scored exactly.

The rules (sizes, colours, noise, visibility, held-out combinations, caption pattern) are those of the
ShapesWorld v1 specification; constants below are its values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STUFF_COLOURS: dict[str, tuple[int, int, int]] = {
    "sky": (135, 200, 235),
    "grass": (70, 150, 60),
    "sand": (220, 195, 145),
    "water": (40, 90, 170),
    "wall": (185, 185, 185),
}
THING_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (45, 75, 215),
    "yellow": (240, 205, 35),
    "purple": (140, 60, 185),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "star"), ("orange", "triangle"), ("black", "circle")}
)

IMAGE_SIZE_RANGE = (192, 448)  # inclusive, for width and height independently
STUFF_NOISE = 20  # uniform integer noise in [-20, 20] per channel on stuff pixels
MIN_RADIUS = 12.0
MIN_VISIBLE_FRACTION = 0.6
SMALL_BELOW, LARGE_ABOVE = 28.0, 48.0
STAR_INNER_RATIO = 0.45
MAX_PLACEMENT_TRIES = 1000
MAX_THINGS = 5  # one to five shapes per image


@dataclass
class Thing:
    """One drawn shape. `mask` (H, W) bool holds its visible pixels; `area` its full drawn area."""

    colour: str
    shape: str
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float
    angle: float  # degrees
    mask: np.ndarray
    area: int

    @property
    def size_word(self) -> str | None:
        if self.radius < SMALL_BELOW:
            return "small"
        if self.radius > LARGE_ABOVE:
            return "large"
        return None

    @property
    def name(self) -> str:
        """The class name, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"

    def mention(self) -> str:
        """How a caption mentions it, e.g. "a large red circle"."""
        words = [w for w in (self.size_word, self.colour, self.shape) if w]
        return "a " + " ".join(words)


@dataclass
class StuffRegion:
    """A background region; `mask` (H, W) bool holds its visible pixels (not covered by things)."""

    name: str
    position: str  # "full", "top" or "bottom"
    mask: np.ndarray


@dataclass
class Scene:
    """A rendered image (H, W, 3) uint8 with its ground truth."""

    image: np.ndarray
    stuff: list[StuffRegion]
    things: list[Thing]

    @property
    def caption(self) -> str:
        """Things left to right by centre, then the stuff: "a red circle and a blue square on grass"."""
        mentions = [t.mention() for t in sorted(self.things, key=lambda t: t.centre[0])]
        things = mentions[0] if len(mentions) == 1 else ", ".join(mentions[:-1]) + " and " + mentions[-1]
        if len(self.stuff) == 1:
            return f"{things} on {self.stuff[0].name}"
        top = next(s.name for s in self.stuff if s.position == "top")
        bottom = next(s.name for s in self.stuff if s.position == "bottom")
        return f"{things} on {bottom} under {top}"

    def class_names(self) -> list[str]:
        """Names of the classes present: thing classes ("red circle") then stuff classes."""
        things = sorted({t.name for t in self.things})
        return things + [s.name for s in self.stuff]


def shape_outline(shape: str, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray | None:
    """Polygon vertices (K, 2) as (x, y) for square, triangle and star; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        # Half the side is `radius`, so the corners sit at radius * sqrt(2).
        radii = [radius * math.sqrt(2.0)] * 4
        angles = [45.0 + 90.0 * k for k in range(4)]
    elif shape == "triangle":
        radii = [radius] * 3
        angles = [-90.0 + 120.0 * k for k in range(3)]
    elif shape == "star":
        radii = [radius if k % 2 == 0 else radius * STAR_INNER_RATIO for k in range(10)]
        angles = [-90.0 + 36.0 * k for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    theta = np.deg2rad(np.asarray(angles) + angle)
    r = np.asarray(radii)
    return np.stack([centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)], axis=1)


def rasterise(
    shape: str, centre: tuple[float, float], radius: float, angle: float, hw: tuple[int, int]
) -> np.ndarray:
    """Bool mask (H, W) of the pixels whose centres lie inside the shape (tested within its box)."""
    height, width = hw
    left, right, up, down = shape_extent(shape, radius, angle)
    x0, x1 = max(0, math.floor(centre[0] - left)), min(width, math.ceil(centre[0] + right) + 1)
    y0, y1 = max(0, math.floor(centre[1] - up)), min(height, math.ceil(centre[1] + down) + 1)
    mask = np.zeros((height, width), dtype=bool)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    outline = shape_outline(shape, centre, radius, angle)
    if outline is None:
        mask[y0:y1, x0:x1] = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2
    else:
        mask[y0:y1, x0:x1] = points_in_polygon(xs, ys, outline)
    return mask


def points_in_polygon(xs: np.ndarray, ys: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (same-shaped xs, ys) lie inside the closed polygon (K, 2)."""
    inside = np.zeros(xs.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        x_at_y = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at_y)
    return inside


def shape_extent(shape: str, radius: float, angle: float) -> tuple[float, float, float, float]:
    """How far the shape reaches from its centre: (left, right, up, down) in pixels."""
    outline = shape_outline(shape, (0.0, 0.0), radius, angle)
    if outline is None:
        return radius, radius, radius, radius
    return -outline[:, 0].min(), outline[:, 0].max(), -outline[:, 1].min(), outline[:, 1].max()


def sample_thing_kinds(rng: np.random.Generator, count: int, allow_held_out: bool) -> list[tuple[str, str]]:
    """`count` (colour, shape) pairs; held-out combinations only when `allow_held_out`."""
    colours, kinds = list(THING_COLOURS), []
    while len(kinds) < count:
        pair = (colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])
        if allow_held_out or pair not in HELD_OUT:
            kinds.append(pair)
    return kinds


def place_things(
    rng: np.random.Generator, kinds: list[tuple[str, str]], hw: tuple[int, int]
) -> list[Thing] | None:
    """Draw sizes, rotations and centres; None when a shape would end less than 60% visible."""
    height, width = hw
    things: list[Thing] = []
    for colour, shape in kinds:
        radius = float(rng.uniform(MIN_RADIUS, min(width, height) / 4))
        angle = float(rng.uniform(0.0, 360.0)) if shape != "circle" else 0.0
        left, right, up, down = shape_extent(shape, radius, angle)
        centre = (float(rng.uniform(left, width - right)), float(rng.uniform(up, height - down)))
        mask = rasterise(shape, centre, radius, angle, hw)
        for earlier in things:
            earlier.mask &= ~mask
        things.append(Thing(colour, shape, centre, radius, angle, mask, int(mask.sum())))
    if any(t.area == 0 or t.mask.sum() < MIN_VISIBLE_FRACTION * t.area for t in things):
        return None
    return things


def sample_stuff(rng: np.random.Generator, height: int) -> list[tuple[str, str, int, int]]:
    """Stuff regions as (name, position, first row, end row)."""
    names = list(STUFF_COLOURS)
    if rng.random() < 0.5:
        return [(names[rng.integers(len(names))], "full", 0, height)]
    y0 = int(round(rng.uniform(0.3 * height, 0.7 * height)))
    top = names[rng.integers(len(names))]
    bottom_choices = [n for n in names if n != top and n != "sky"]
    bottom = bottom_choices[rng.integers(len(bottom_choices))]
    return [(top, "top", 0, y0), (bottom, "bottom", y0, height)]


def render_scene(rng: np.random.Generator, allow_held_out: bool = False) -> Scene:
    """Draw one ShapesWorld image with its ground truth.

    Training data passes `allow_held_out=False` so the held-out combinations never appear;
    evaluation of compositional generalisation passes True.
    """
    width = int(rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1))
    height = int(rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1))
    image = np.empty((height, width, 3), dtype=np.int16)
    regions = sample_stuff(rng, height)
    for name, _, y_start, y_end in regions:
        noise = rng.integers(-STUFF_NOISE, STUFF_NOISE + 1, size=(y_end - y_start, width, 3))
        image[y_start:y_end] = np.asarray(STUFF_COLOURS[name], dtype=np.int16) + noise
    image = np.clip(image, 0, 255).astype(np.uint8)

    kinds = sample_thing_kinds(rng, int(rng.integers(1, MAX_THINGS + 1)), allow_held_out)
    for _ in range(MAX_PLACEMENT_TRIES):
        things = place_things(rng, kinds, (height, width))
        if things is not None:
            break
    else:
        raise RuntimeError("could not place the shapes with the visibility rule")

    covered = np.zeros((height, width), dtype=bool)
    for thing in things:
        image[thing.mask] = THING_COLOURS[thing.colour]
        covered |= thing.mask
    stuff = []
    for name, position, y_start, y_end in regions:
        mask = np.zeros((height, width), dtype=bool)
        mask[y_start:y_end] = True
        stuff.append(StuffRegion(name, position, mask & ~covered))
    return Scene(image=image, stuff=stuff, things=things)
