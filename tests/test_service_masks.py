"""Mask encodings (COCO RLE, PNG, polygons) and boxes, on synthetic masks."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.images import size_bucket
from service.masks import encode_mask, encode_polygon, mask_box_and_area, trace_boundaries


def shoelace(loop: list[float]) -> float:
    xs, ys = np.asarray(loop[0::2]), np.asarray(loop[1::2])
    return 0.5 * float(np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys))


def l_shape() -> np.ndarray:
    mask = np.zeros((20, 30), bool)
    mask[2:8, 3:10] = True
    mask[8:15, 5:7] = True
    return mask


def test_rle_round_trips_and_matches_box_and_area():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = encode_mask(mask, "rle")
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)
    box, area = mask_box_and_area(mask)
    assert area == int(mask.sum())
    coco_box = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}).tolist()
    assert box == [int(v) for v in coco_box]


def test_png_round_trips():
    mask = l_shape()
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(encode_mask(mask, "png"))))) > 0
    assert np.array_equal(decoded, mask)


def test_polygon_of_a_rectangle_is_its_four_corners():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert encode_polygon(mask) == [[3.0, 2.0, 9.0, 2.0, 9.0, 5.0, 3.0, 5.0]]


def test_polygon_areas_equal_pixel_counts_and_holes_are_separate_loops():
    mask = l_shape()
    mask[4:6, 5:7] = False  # a hole
    loops = trace_boundaries(mask)
    outer = [loop for loop in loops if shoelace(loop) > 0]
    holes = [loop for loop in loops if shoelace(loop) < 0]
    assert len(outer) == 1 and len(holes) == 1
    assert sum(shoelace(loop) for loop in loops) == mask.sum()  # outer area minus hole area
    assert encode_polygon(mask) == outer


def test_parts_touching_at_a_corner_are_separate_polygons():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    mask[3:5, 3:5] = True
    polygons = encode_polygon(mask)
    assert len(polygons) == 2 and all(shoelace(p) == 4 for p in polygons)


def test_polygons_rasterise_back_to_the_mask():
    mask = l_shape()
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(encode_polygon(mask), 20, 30)))
    assert (drawn.astype(bool) & mask).sum() / (drawn.astype(bool) | mask).sum() > 0.85


def test_empty_mask():
    mask = np.zeros((4, 4), bool)
    assert mask_box_and_area(mask) == ([0, 0, 0, 0], 0)
    assert encode_polygon(mask) == []


def test_size_buckets_separate_shapes_and_sizes():
    assert size_bucket(640, 480) == size_bucket(600, 450) == "wide-m"
    assert size_bucket(480, 640) == "tall-m"
    assert size_bucket(100, 100) == "square-s"
    assert size_bucket(2000, 1900) == "square-l"
