"""Mask encodings of the API (COCO RLE, base64 PNG, polygons) and the boxes derived from masks.

Runs in the worker processes: a mask is a bool array (H, W) at the original image size.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

MASK_FORMATS = ("rle", "png", "polygon")


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE `{"size": [h, w], "counts": str}` of a bool mask (H, W)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_png(mask: np.ndarray) -> str:
    """Base64 of a 1-bit PNG of the mask (white = inside)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(bool)).convert("1").save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_polygon(mask: np.ndarray) -> list[list[float]]:
    """Outer boundaries of the mask's 4-connected parts as COCO polygons `[x1, y1, x2, y2, ...]`.

    Vertices lie on pixel corners (pixel (r, c) covers [c, c+1] x [r, r+1]); as in COCO, holes are not
    represented.
    """
    return [loop for loop in trace_boundaries(mask) if _signed_area(loop) > 0]


def mask_box_and_area(mask: np.ndarray) -> tuple[list[int], int]:
    """`[x, y, w, h]` of the tightest box around the mask and its pixel count; zeros for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return [0, 0, 0, 0], 0
    box = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
    return box, int(mask.sum())


def encode_mask(mask: np.ndarray, mask_format: str) -> dict | str | list:
    if mask_format == "rle":
        return encode_rle(mask)
    if mask_format == "png":
        return encode_png(mask)
    if mask_format == "polygon":
        return encode_polygon(mask)
    raise ValueError(f"unknown mask format {mask_format!r}")


# Unit steps (dx, dy) in image coordinates (y points down), and the step after a right turn.
_RIGHT_TURN = {(1, 0): (0, 1), (0, 1): (-1, 0), (-1, 0): (0, -1), (0, -1): (1, 0)}


def _boundary_edges(mask: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed unit edges between inside and outside pixels, keyed by start corner, inside on the right."""
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # (neighbour offset (dr, dc), start corner (dx, dy) and step of the edge on that side of the pixel)
    sides = [
        ((-1, 0), (0, 0), (1, 0)),
        ((0, 1), (1, 0), (0, 1)),
        ((1, 0), (1, 1), (-1, 0)),
        ((0, -1), (0, 1), (0, -1)),
    ]
    h, w = inside.shape
    for (dr, dc), (sx, sy), step in sides:
        neighbour = padded[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]
        rows, cols = np.nonzero(inside & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            edges.setdefault((c + sx, r + sy), []).append(step)
    return edges


def trace_boundaries(mask: np.ndarray) -> list[list[float]]:
    """Every closed boundary of the mask, outer ones clockwise on screen, holes counter-clockwise.

    At a corner where two parts touch diagonally the walk turns right, keeping the parts apart.
    Collinear corners are dropped, so a rectangle gives four vertices.
    """
    edges = _boundary_edges(mask)
    loops = []
    while edges:
        start = next(iter(edges))
        corner, step = start, None
        points: list[tuple[int, int]] = []
        while corner in edges:
            steps = edges[corner]
            next_step = _RIGHT_TURN[step] if step is not None and _RIGHT_TURN[step] in steps else steps[0]
            steps.remove(next_step)
            if not steps:
                del edges[corner]
            if next_step != step:
                points.append(corner)
            step = next_step
            corner = (corner[0] + step[0], corner[1] + step[1])
            if corner == start:
                break
        if len(points) > 2 and _step_between(points[0], points[1]) == step:
            points = points[1:]  # the start corner sat in the middle of a straight run
        loops.append([float(v) for point in points for v in point])
    return loops


def _step_between(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return (int(np.sign(b[0] - a[0])), int(np.sign(b[1] - a[1])))


def _signed_area(loop: list[float]) -> float:
    """Shoelace area; positive for loops clockwise on screen (y down), i.e. outer boundaries."""
    xs, ys = np.asarray(loop[0::2]), np.asarray(loop[1::2])
    return 0.5 * float(np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys))
