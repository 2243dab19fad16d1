"""The tolerance rules of the reference cases, on small synthetic archives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.reference_compare import compare_array, compare_instances, compare_segments_info


def make_case(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    full = rng.standard_normal((4, 5)).astype(np.float32)
    big = rng.standard_normal((50, 50)).astype(np.float32)
    indices = np.sort(rng.choice(big.size, 100, replace=False)).astype(np.int64)
    mask = rng.random((3, 13)) > 0.5
    arrays = {
        "a.full": full,
        "a.big.shape": np.array(big.shape),
        "a.big.mean": np.float64(big.mean(dtype=np.float64)),
        "a.big.std": np.float64(big.astype(np.float64).std()),
        "a.big.sampled_indices": indices,
        "a.big.sampled_values": big.reshape(-1)[indices],
        "a.ids": np.arange(6, dtype=np.int64),
        "a.mask_packed": np.packbits(mask, axis=-1),
        "a.mask_shape": np.array(mask.shape),
    }
    path = tmp_path / "t.npz"
    np.savez_compressed(path, **arrays)
    tol = {"atol_max": 1e-3, "atol_p99": 1e-4}
    case = {
        "tasks": {
            "t": {
                "file": "t.npz",
                "arrays": {
                    "a.full": {"shape": [4, 5], "storage": "full", "tolerance": tol},
                    "a.big": {"shape": [50, 50], "storage": "sampled", "tolerance": tol},
                    "a.ids": {"shape": [6], "storage": "full", "tolerance": "exact"},
                    "a.mask": {
                        "shape": [3, 13],
                        "storage": "packbits(axis=-1)",
                        "tolerance": "bool: at most max(4, 1e-4 * numel) elements differ",
                    },
                },
            }
        }
    }
    return path, case | {"_full": full, "_big": big, "_mask": mask}


def test_float_rule_full_and_sampled(tmp_path: Path) -> None:
    path, case = make_case(tmp_path)
    full, big = case["_full"], case["_big"]
    ok, max_abs, max_rel = compare_array("a.full", torch.from_numpy(full) + 5e-5, path, case)
    assert ok and max_abs == pytest.approx(5e-5, rel=1e-2) and max_rel > 0
    # One element off by 5e-4: within atol_max, but the 99th percentile of 20 values sees it.
    off = full.copy()
    off[0, 0] += 5e-4
    assert not compare_array("a.full", off, path, case)[0]
    assert compare_array("a.big", big, path, case)[0]
    # An error outside the sampled positions is still caught by the mean/std check.
    unsampled = np.ones(big.size, dtype=bool)
    unsampled[np.load(path)["a.big.sampled_indices"]] = False
    shifted = big.reshape(-1).copy()
    shifted[unsampled] += 1e-3
    ok, max_abs, _ = compare_array("a.big", shifted.reshape(big.shape), path, case)
    assert not ok and max_abs == 0.0
    assert not compare_array("a.full", full[:3], path, case)[0]


def test_exact_and_packbits_rules(tmp_path: Path) -> None:
    path, case = make_case(tmp_path)
    assert compare_array("a.ids", np.arange(6), path, case) == (True, 0.0, 0.0)
    assert compare_array("a.ids", np.array([0, 1, 2, 3, 4, 6]), path, case)[:2] == (False, 1.0)
    mask = case["_mask"].copy()
    mask.reshape(-1)[:4] ^= True  # 4 flips are allowed (max(4, 1e-4 * 39))
    assert compare_array("a.mask", mask, path, case) == (True, 4.0, 4 / 39)
    mask.reshape(-1)[4] ^= True
    assert not compare_array("a.mask", mask, path, case)[0]


def test_segments_info_and_instance_sets(tmp_path: Path) -> None:
    assert compare_segments_info(
        [{"id": 1, "category_id": 3, "isthing": False, "score": 0.9}],
        [{"id": 1, "category_id": 3, "isthing": False}],
    )
    assert not compare_segments_info([{"id": 1, "category_id": 2, "isthing": True}], [])

    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2] = True
    path = tmp_path / "inst.npz"
    np.savez(
        path,
        **{
            "post.instances_query_index": np.array([7, 3]),
            "post.instances_pred_classes": np.array([0, 1]),
            "post.instances_scores": np.array([0.5, 0.25], dtype=np.float32),
            "post.instances_pred_masks": masks,
        },
    )
    tol = {"atol_max": 1e-3, "atol_p99": 1e-3}
    case = {"arrays": {"post.instances_scores": {"shape": [2], "storage": "full", "tolerance": tol}}}
    swapped = {"query_indices": [3, 7], "labels": [1, 0], "scores": [0.25, 0.5], "masks": masks[::-1]}
    assert compare_instances(swapped, path, case)[0]
    wrong_class = swapped | {"labels": [2, 0]}
    assert not compare_instances(wrong_class, path, case)[0]
    assert compare_instances(wrong_class, path, case, boundary_gap=1e-5)[0]
    wrong_mask = swapped | {"masks": masks}
    assert not compare_instances(wrong_mask, path, case)[0]
