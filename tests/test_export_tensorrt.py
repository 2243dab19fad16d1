"""What the TensorRT path computes without TensorRT: optimisation profiles from the batcher's size
buckets, profile choice, and the refusal to build without TensorRT. (The plugin node contract and the
engine plan of a real export are in test_export.py; gpu_check.sh builds and compares real engines.)"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from export.tensorrt_profiles import (
    MAX_ASPECT,
    TASK_GRAPHS,
    axis_ranges,
    graph_profiles,
    image_profiles,
    input_shapes,
)
from export.tensorrt_runtime import pick_profile
from models.configs import ResizeRule, get_config
from models.preprocess import padded_size, resized_shape
from service.cli import main
from service.images import size_bucket

BUCKETS = {f"{shape}-{size}" for shape in ("wide", "square", "tall") for size in "sml"}


@pytest.mark.parametrize("name", ["demo", "xdecoder-focalt"])
def test_profiles_cover_every_bucket_of_every_task(name: str) -> None:
    cfg = get_config(name)
    profiles = image_profiles(cfg, max_batch_size=6, max_retrieve_items=4)
    for task in TASK_GRAPHS:
        mine = [p for p in profiles if p.task == task]
        served = [b for p in mine for b in p.name.split(":")[1].split(",")]
        assert sorted(served) == sorted(BUCKETS), task  # every bucket exactly once
        for p in mine:
            assert p.batch == ((1, 24, 24) if task == "retrieval" else (1, 6, 6))
            for low, opt, high in (p.height, p.width):
                assert low <= opt <= high and low % 32 == 0 and high % 32 == 0
    # Real originals of random sizes land in the profile of their own bucket.
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(40, 3000, 2))
        if max(h, w) > MAX_ASPECT * min(h, w):
            continue
        bucket = size_bucket(w, h)
        for task in TASK_GRAPHS:
            ph, pw = padded_size(*resized_shape(h, w, cfg.resize[task]))
            (profile,) = [p for p in profiles if p.task == task and bucket in p.name.split(":")[1].split(",")]
            assert profile.height[0] <= ph <= profile.height[2], (task, bucket, h, w)
            assert profile.width[0] <= pw <= profile.width[2], (task, bucket, h, w)


def test_focalt_segmentation_profiles_follow_the_shortest_edge_rule() -> None:
    profiles = {
        p.name.split(":")[0] + ":" + p.name.split(":")[1].split("-")[0]: p
        for p in image_profiles(get_config("xdecoder-focalt"))
    }
    square = profiles["segmentation:square"]
    assert (square.height, square.width) == ((800, 800, 1024), (800, 800, 1024))
    wide = profiles["segmentation:wide"]
    assert wide.height[2] == 800 and wide.width[2] == 1344  # 1333 padded to 1344
    (captioning,) = [p for p in profiles.values() if p.task == "captioning"]
    assert captioning.height == captioning.width == (224, 224, 224)


def test_demo_profiles_span_small_images_up_to_the_long_side_cap() -> None:
    """The demo's scale rule: a small original stays small, a large one is capped (and padded)."""
    rule = get_config("demo").resize["segmentation"]
    for profile in image_profiles(get_config("demo")):
        assert profile.height[0] == profile.width[0] == 32
        assert max(profile.height[2], profile.width[2]) == padded_size(rule.max_size, rule.max_size)[0]


def test_graph_inputs_get_their_axes_from_the_profile() -> None:
    cfg = get_config("demo")
    cfg.resize = {task: ResizeRule(fixed=(160, 160)) for task in cfg.resize}
    (profile,) = [p for p in image_profiles(cfg, 8) if p.task == "captioning"]
    ranges = axis_ranges(profile)
    inputs = {
        "images": ["batch", 3, "height", "width"],
        "mask_features": ["batch", 64, "h4", "w4"],
        "cross_k0": ["k32", "batch", 64],
    }
    shapes = input_shapes(inputs, ranges)
    assert shapes["images"] == [[1, 3, 160, 160], [8, 3, 160, 160], [8, 3, 160, 160]]
    assert shapes["mask_features"] == [[1, 64, 40, 40], [8, 64, 40, 40], [8, 64, 40, 40]]
    assert shapes["cross_k0"] == [[25, 1, 64], [25, 8, 64], [25, 8, 64]]
    text = graph_profiles("text_encoder", {"input_ids": ["texts", "length"]}, [profile])
    assert text == [{"input_ids": [[1, 1], [81, 16], [256, 77]]}]
    # a graph that no task of the given profiles runs gets none
    assert graph_profiles("grounding_decoder", inputs, [profile]) == []


def test_pick_profile_takes_the_first_that_holds_every_input() -> None:
    profiles = [
        {"images": ((1, 3, 160, 160), (8, 3, 160, 160))},
        {"images": ((1, 3, 128, 320), (8, 3, 512, 512))},
    ]
    assert pick_profile({"images": (4, 3, 160, 160)}, profiles) == 0
    assert pick_profile({"images": (4, 3, 256, 480)}, profiles) == 1
    with pytest.raises(ValueError, match="outside every optimisation profile"):
        pick_profile({"images": (9, 3, 160, 160)}, profiles)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present: gpu_check.sh builds"
)
def test_tensorrt_command_explains_the_missing_install(tmp_path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "onnx").mkdir()
    status = main(
        ["export", "tensorrt", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "engines")]
    )
    assert status == 1
    assert "TensorRT is not installed" in capsys.readouterr().err
