"""Closed label sets of the Mask2Former checkpoints, and the selection of a request vocabulary from them.

A closed-vocabulary model predicts a fixed list of classes (the label set of its training data); a
request's vocabulary can only pick classes from that list. Class index i is the i-th name below: the
contiguous ids of the detectron2 metadata the released models were trained with.

- COCO panoptic: 133 classes, the 80 things (COCO ids 1..90 in order) then the 53 stuff classes
  (ids 92..200 in order), names as in the panoptic annotations ("-merged" / "-other" / "-stuff"
  suffixes included).
- ADE20K (SceneParsing, 150 classes): the names of the semantic-segmentation metadata, where one
  class may list several synonyms separated by commas ("road, route").

A name in a request matches a class by its full name or, as a shorter alias, by one of its
comma-separated synonyms, or by the full name without the "-merged" / "-other" suffixes (the short
stuff names detectron2 itself shows: "sky", "wall", "tree"). Matching ignores case and surrounding
spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

COCO_PANOPTIC_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

COCO_PANOPTIC_STUFF = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood",
    "flower", "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform",
    "playingfield", "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs",
    "tent", "towel", "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "window-blind", "window-other", "tree-merged", "fence-merged", "ceiling-merged",
    "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged", "pavement-merged",
    "mountain-merged", "grass-merged", "dirt-merged", "paper-merged", "food-other-merged",
    "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)  # fmt: skip

ADE20K_150 = (
    # "window" is "window " (trailing space) in the detectron2 metadata
    "wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "bed", "window", "grass",
    "cabinet", "sidewalk, pavement", "person", "earth, ground", "door", "table", "mountain, mount",
    "plant", "curtain", "chair", "car", "water", "painting, picture", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock, stone",
    "wardrobe, closet, press", "lamp", "tub", "rail", "cushion", "base, pedestal, stand", "box",
    "column, pillar", "signboard, sign", "chest of drawers, chest, bureau, dresser", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator, icebox", "grandstand, covered stand",
    "path", "stairs", "runway", "case, display case, showcase, vitrine",
    "pool table, billiard table, snooker table", "pillow", "screen door, screen",
    "stairway, staircase", "river", "bridge, span", "bookcase", "blind, screen", "coffee table",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm, palm tree", "kitchen island", "computer", "swivel chair", "boat",
    "bar", "arcade machine", "hovel, hut, hutch, shack, shanty", "bus", "towel", "light", "truck",
    "tower", "chandelier", "awning, sunshade, sunblind", "street lamp", "booth", "tv", "plane",
    "dirt track", "clothes", "pole", "land, ground, soil",
    "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock",
    "bottle", "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card", "stage",
    "van", "ship", "fountain", "conveyer belt, conveyor belt, conveyer, conveyor, transporter",
    "canopy", "washer, automatic washer, washing machine", "plaything, toy", "pool", "stool",
    "barrel, cask", "basket, handbasket", "falls", "tent", "bag", "minibike, motorbike", "cradle",
    "oven", "ball", "food, solid food", "step, stair", "tank, storage tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket, cover",
    "sculpture", "hood, exhaust hood", "sconce", "vase", "traffic light", "tray", "trash can", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass, drinking glass", "clock", "flag",
)  # fmt: skip


def _normalise(name: str) -> str:
    return " ".join(name.lower().split())


def _aliases(name: str) -> list[str]:
    """Shorter names that also select the class `name` (see the module docstring)."""
    out = [s.strip() for s in name.split(",")]
    short = name.replace("-merged", "").replace("-other", "")
    if short != name:
        out.append(short)
    return [_normalise(a) for a in out if a]


@dataclass(frozen=True)
class LabelSet:
    """The classes of a closed-vocabulary model: `names[i]` is class i; `isthing[i]` whether class i is
    a countable thing (panoptic: instances) or stuff (one region per class)."""

    name: str
    names: tuple[str, ...]
    isthing: tuple[bool, ...]
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.isthing):
            raise ValueError(f"label set {self.name}: {len(self.names)} names, {len(self.isthing)} flags")
        lookup = {_normalise(n): i for i, n in enumerate(self.names)}
        if len(lookup) != len(self.names):
            raise ValueError(f"label set {self.name}: repeated class names")
        # An alias never overrides a full name, and an alias shared by two classes selects neither.
        claimed: dict[str, set[int]] = {}
        for i, n in enumerate(self.names):
            for alias in _aliases(n):
                claimed.setdefault(alias, set()).add(i)
        for alias, owners in claimed.items():
            if alias not in lookup and len(owners) == 1:
                lookup[alias] = next(iter(owners))
        object.__setattr__(self, "_lookup", lookup)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int | None:
        """Class index of a full name or alias, or None."""
        return self._lookup.get(_normalise(name))

    def select(self, vocabulary: Sequence[str]) -> list[int]:
        """Class indices of the requested names, in request order.

        Raises `ValueError` for an empty vocabulary, a class requested twice, or unknown names (the
        message lists the valid labels).
        """
        if not vocabulary:
            raise ValueError(f"empty vocabulary; valid labels of {self.name}: {self.valid_labels()}")
        indices, unknown, seen = [], [], {}
        for requested in vocabulary:
            i = self.index(requested)
            if i is None:
                unknown.append(requested)
            elif i in seen:
                raise ValueError(f"{requested!r} and {seen[i]!r} both name the class {self.names[i]!r}")
            else:
                seen[i] = requested
                indices.append(i)
        if unknown:
            names = ", ".join(repr(u) for u in unknown)
            raise ValueError(
                f"unknown label(s) {names} for the closed label set {self.name}; "
                f"valid labels: {self.valid_labels()}"
            )
        return indices

    def accepted_names(self) -> list[str]:
        """Every spelling `select` accepts (normalised full names and unambiguous aliases), sorted."""
        return sorted(self._lookup)

    def valid_labels(self) -> str:
        return ", ".join(self.names)


COCO_PANOPTIC = LabelSet(
    "coco-panoptic",
    COCO_PANOPTIC_THINGS + COCO_PANOPTIC_STUFF,
    (True,) * len(COCO_PANOPTIC_THINGS) + (False,) * len(COCO_PANOPTIC_STUFF),
)
# Semantic segmentation needs no thing/stuff split: every class is treated as stuff.
ADE20K_SEMANTIC = LabelSet("ade20k-150", ADE20K_150, (False,) * len(ADE20K_150))

LABEL_SETS = {s.name: s for s in (COCO_PANOPTIC, ADE20K_SEMANTIC)}


def get_label_set(name: str) -> LabelSet:
    if name not in LABEL_SETS:
        raise KeyError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}")
    return LABEL_SETS[name]


def select_class_logits(logits: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Restrict closed-vocabulary class logits (..., K+1) (last column: no object) to the requested
    classes: (..., n+1), the n requested columns in order, then one column whose logit is the
    log-sum-exp of the no-object column and every class not requested.

    A softmax over the result gives exactly the full-vocabulary probabilities of the requested classes;
    the probability of the classes left out joins "no object", so a query that found an unrequested
    class is not relabelled as a requested one.
    """
    k = logits.shape[-1] - 1
    index = torch.as_tensor(list(indices), dtype=torch.long, device=logits.device)
    if index.numel() and (index.min() < 0 or index.max() >= k):
        raise ValueError(f"class indices must lie in [0, {k})")
    rest = torch.ones(k + 1, dtype=torch.bool, device=logits.device)
    rest[index] = False
    other = logits[..., rest].logsumexp(dim=-1, keepdim=True)
    return torch.cat((logits[..., index], other), dim=-1)
