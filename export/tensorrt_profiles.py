"""TensorRT optimisation profiles that match the service's batching (no TensorRT needed here).

The batcher queues requests per size bucket (`service.images.size_bucket`: shape class wide / square /
tall times size class s / m / l). Each task resizes by its rule (`XDecoderConfig.resize`) and pads to
a multiple of 32, so a bucket maps to a range of padded input sizes. Sampling aspect ratios of every
shape class (up to `MAX_ASPECT`) gives that range: min and max per axis, the median as the optimum.
The size classes of one shape class share a profile (a shortest-edge rule resizes them alike; under
a scale rule the profile spans them all), and so do shape classes with the same range (a fixed-size
rule). Batch ranges come from
the batcher's `max_batch_size` (retrieval and image embedding pass every image of a batch at once:
`max_batch_size * max_retrieve_items`).

A graph's profile gives (min, opt, max) for every dynamic axis of its inputs, by the axis names of
`export.graphs` (batch, height, width, h4, w32, k8, tokens, ...); fixed axes keep their size.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from models.configs import ResizeRule, XDecoderConfig
from models.preprocess import padded_size, resized_shape

MAX_ASPECT = 4.0  # original images up to 4:1 (either way) are covered by the profiles
RATIO_SAMPLES = 4001
SIZE_CLASSES = ("s", "m", "l")
MAX_TOKENS = 77
TEXT_BATCH = 256  # prompts per text-encoder call (`TextEncoderConfig.prompt_chunk_size`)
MAX_VOCABULARY = 257  # the service's default max vocabulary, plus "background"

# Graphs each task runs, and the tasks whose images each graph sees.
TASK_GRAPHS = {
    "segmentation": ("image_encoder", "segment_decoder"),
    "grounding": ("image_encoder", "grounding_decoder"),
    "captioning": ("image_encoder", "caption_state", "caption_step"),
    "retrieval": ("image_encoder", "segment_decoder"),
}

Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class ImageProfile:
    """One optimisation profile of the image side: `name` lists the task and the buckets it serves."""

    name: str
    task: str
    batch: Range
    height: Range
    width: Range


def shape_class_shapes(rule: ResizeRule) -> dict[str, list[tuple[int, int]]]:
    """Padded (H, W) after `rule` of originals of every aspect ratio, per shape class of the batcher.

    Under a shortest-edge or fixed rule the resized shape depends only on the aspect ratio, so ratios
    are sampled densely up to `MAX_ASPECT`, including the class boundaries; each sample is classified
    by `size_bucket` itself. A scale rule also keeps small images small: the large originals give
    the largest shape of each ratio, and every class also gets the smallest shape (a 1-pixel image).
    """
    from service.images import size_bucket

    base = 1_000_000  # the short side of the sampled originals: any ratio is representable
    ratios = np.concatenate(
        [np.geomspace(1 / MAX_ASPECT, MAX_ASPECT, RATIO_SAMPLES), [0.8 - 1e-6, 0.8, 1.25, 1.25 + 1e-6]]
    )
    shapes: dict[str, list[tuple[int, int]]] = {}
    for ratio in ratios:
        h, w = (base, round(base * ratio)) if ratio >= 1 else (round(base / ratio), base)
        shape_class = size_bucket(w, h).split("-")[0]
        shapes.setdefault(shape_class, []).append(padded_size(*resized_shape(h, w, rule)))
    if rule.scale is not None:
        for samples in shapes.values():
            samples.append(padded_size(*resized_shape(1, 1, rule)))
    return shapes


def _range(values: list[int]) -> Range:
    opt = int(statistics.median_low(values))
    return min(values), opt, max(values)


def image_profiles(
    cfg: XDecoderConfig, max_batch_size: int = 8, max_retrieve_items: int = 32, tasks: list[str] | None = None
) -> list[ImageProfile]:
    """The image-side profiles of `cfg` for the given tasks (all four by default)."""
    profiles: list[ImageProfile] = []
    for task in tasks or list(TASK_GRAPHS):
        if task not in TASK_GRAPHS:
            raise ValueError(f"unknown task {task!r} for a profile; use one of {', '.join(TASK_GRAPHS)}")
        batch_max = max_batch_size * (max_retrieve_items if task == "retrieval" else 1)
        batch = (1, batch_max, batch_max)
        # One profile per shape class (a shortest-edge rule resizes the size classes s / m / l of
        # one shape alike), merged when two shape classes give the same range (a fixed-size rule).
        merged: dict[tuple[Range, Range], list[str]] = {}
        for shape_class, shapes in shape_class_shapes(cfg.resize[task]).items():
            key = (_range([h for h, _ in shapes]), _range([w for _, w in shapes]))
            merged.setdefault(key, []).extend(f"{shape_class}-{size}" for size in SIZE_CLASSES)
        for (height, width), names in merged.items():
            profiles.append(ImageProfile(f"{task}:{','.join(names)}", task, batch, height, width))
    return profiles


def axis_ranges(profile: ImageProfile | None) -> dict[str, Range]:
    """(min, opt, max) of every named dynamic axis under an image profile (None: text graphs)."""
    ranges: dict[str, Range] = {
        "classes": (1, 16, MAX_VOCABULARY),
        "tokens": (1, 8, MAX_TOKENS),
        "length": (1, 16, MAX_TOKENS),
        "texts": (1, 81, TEXT_BATCH),
    }
    if profile is None:
        return ranges
    ranges |= {"batch": profile.batch, "height": profile.height, "width": profile.width}
    for stride in (4, 8, 16, 32):
        h = tuple(v // stride for v in profile.height)
        w = tuple(v // stride for v in profile.width)
        ranges[f"h{stride}"], ranges[f"w{stride}"] = h, w  # type: ignore[assignment]
        ranges[f"k{stride}"] = tuple(a * b for a, b in zip(h, w, strict=True))  # type: ignore[assignment]
    return ranges


def input_shapes(inputs: dict[str, list[int | str]], ranges: dict[str, Range]) -> dict[str, list[list[int]]]:
    """Per input, its [min, opt, max] shapes: fixed axes as they are, named axes from `ranges`.

    `inputs` maps input names to their ONNX dims (an int, or the axis name of a dynamic axis).
    """
    shapes = {}
    for name, dims in inputs.items():
        rows: list[list[int]] = [[], [], []]
        for dim in dims:
            values = (dim, dim, dim) if isinstance(dim, int) else ranges[dim]
            for row, value in zip(rows, values, strict=True):
                row.append(int(value))
        shapes[name] = rows
    return shapes


def graph_profiles(
    graph: str,
    inputs: dict[str, list[int | str]],
    profiles: list[ImageProfile],
    fixed_size: tuple[int, int] | None = None,
) -> list[dict[str, list[list[int]]]]:
    """The optimisation profiles of one graph: one per image profile of a task that runs it (text
    graphs: one). A fixed-size graph keeps only the profiles whose range holds its size, and drops
    duplicates (its image axes are fixed)."""
    if graph == "text_encoder":
        return [input_shapes(inputs, axis_ranges(None))]
    out: list[dict[str, list[list[int]]]] = []
    for profile in profiles:
        if graph not in TASK_GRAPHS[profile.task]:
            continue
        if fixed_size is not None:
            h, w = fixed_size
            if not (
                profile.height[0] <= h <= profile.height[2] and profile.width[0] <= w <= profile.width[2]
            ):
                continue
        shapes = input_shapes(inputs, axis_ranges(profile))
        if shapes not in out:
            out.append(shapes)
    return out
