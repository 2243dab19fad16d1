"""Compare an output with a golden reference array under the rule that the case's JSON gives for it.

A case folder holds `case.json` and one `.npz` per task (see the reference README). For every array,
`case.json` gives its shape, storage and tolerance:

- float rule `{"atol_max", "atol_p99"}`: max|x - ref| <= atol_max and the 99th percentile of
  |x - ref| <= atol_p99 over the stored values; for "sampled" storage also |mean - ref.mean| and
  |std - ref.std| <= atol_p99 (statistics over the whole tensor);
- "exact": same values;
- "bool: at most max(4, 1e-4 * numel) elements differ" (attention masks, stored with packbits);
- "at most 1e-3 of pixels differ";
- "exact at pixels where post.sem_seg_top2_margin > 1e-3" (label maps);
- "segment map equal on at least 99.9% of pixels" (the segments_info part: `compare_segments_info`);
- "rank 1 exact" (top-10 token ids: lower ranks may differ where the reference logits nearly tie);
- the instance set rules, which need several arrays at once: `compare_instances`.

`compare_array` returns (ok, max_abs, max_rel). For float rules max_abs is max|x - ref| and max_rel
is max_abs / max|ref|. For discrete rules max_abs is the number of differing elements and max_rel the
fraction of elements that differ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
INSTANCE_ARRAYS = (
    "post.instances_pred_masks",
    "post.instances_scores",
    "post.instances_pred_classes",
    "post.instances_query_index",
)


def _as_numpy(x: ArrayLike | float | int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _load_npz(reference_npz: str | Path | Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    if isinstance(reference_npz, str | Path):
        return np.load(reference_npz)
    return reference_npz


def _stored_names(npz: Mapping[str, np.ndarray]) -> set[str]:
    files = npz.files if hasattr(npz, "files") else list(npz.keys())
    return set(files)


def _has_array(name: str, spec: dict[str, Any], stored: set[str]) -> bool:
    storage = spec["storage"]
    if storage == "sampled":
        return f"{name}.sampled_values" in stored
    if storage.startswith("packbits"):
        return f"{name}_packed" in stored
    return name in stored


def array_spec(
    name: str, reference_npz: str | Path | Mapping[str, np.ndarray], case_json: str | Path | dict
) -> dict[str, Any]:
    """The `case.json` entry (shape, dtype, storage, tolerance, ...) of one array of this npz.

    `case_json` is the parsed case.json, a path to it, or one task's entry (with "arrays"). Arrays
    of the same name in several tasks (post.sem_seg in seg and postproc) are told apart by which
    task's arrays are all stored in this npz.
    """
    if isinstance(case_json, str | Path):
        case_json = json.loads(Path(case_json).read_text())
    tasks = [case_json] if "arrays" in case_json else list(case_json["tasks"].values())
    candidates = [t for t in tasks if name in t.get("arrays", {})]
    if len(candidates) > 1:
        stored = _stored_names(_load_npz(reference_npz))
        candidates = [t for t in candidates if all(_has_array(n, s, stored) for n, s in t["arrays"].items())]
    if len(candidates) != 1:
        raise KeyError(f"{name}: found in {len(candidates)} tasks of the case, expected one")
    return candidates[0]["arrays"][name]


def reference_array(name: str, reference_npz: str | Path | Mapping[str, np.ndarray]) -> np.ndarray:
    """A fully stored or packbits-stored reference array (sampled arrays have no full form)."""
    npz = _load_npz(reference_npz)
    stored = _stored_names(npz)
    if f"{name}_packed" in stored:
        shape = tuple(int(s) for s in npz[f"{name}_shape"])
        unpacked = np.unpackbits(npz[f"{name}_packed"], axis=-1)[..., : shape[-1]]
        return unpacked.astype(bool).reshape(shape)
    if name in stored:
        return npz[name]
    raise KeyError(f"{name} is not stored in full in this npz")


def _float_rule(
    actual: np.ndarray, ref: np.ndarray, tolerance: dict[str, float]
) -> tuple[bool, float, float]:
    diff = np.abs(actual.astype(np.float64) - ref.astype(np.float64)).ravel()
    if diff.size == 0:
        return True, 0.0, 0.0
    if not np.all(np.isfinite(diff)):
        return False, float("inf"), float("inf")
    max_abs = float(diff.max())
    p99 = float(np.percentile(diff, 99))
    scale = float(np.abs(ref.astype(np.float64)).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = max_abs <= tolerance["atol_max"] and p99 <= tolerance["atol_p99"]
    return ok, max_abs, max_rel


def _count_rule(differs: np.ndarray, allowed: float) -> tuple[bool, float, float]:
    count = int(differs.sum())
    fraction = count / max(differs.size, 1)
    return count <= allowed, float(count), fraction


def _top2_margin(npz: Mapping[str, np.ndarray]) -> np.ndarray:
    """Top-1 minus top-2 of the reference semantic scores per pixel: stored, or computed from a full
    `post.sem_seg`."""
    stored = _stored_names(npz)
    if "post.sem_seg_top2_margin" in stored:
        return npz["post.sem_seg_top2_margin"].astype(np.float32)
    scores = npz["post.sem_seg"]
    if scores.shape[0] < 2:
        return np.full(scores.shape[1:], np.inf, dtype=np.float32)
    top2 = np.sort(scores, axis=0)[-2:]
    return top2[1] - top2[0]


def _top10_ids_rule(
    actual: np.ndarray, ref: np.ndarray, npz: Mapping[str, np.ndarray], atol: float
) -> tuple[bool, float, float]:
    """Rank 1 exact; a lower-rank id may differ only where the reference logit ties a neighbour."""
    differs = actual != ref
    ok = not differs[:, 0].any()
    logits = npz["captioning.step_top10_logits"]
    gaps = np.abs(np.diff(logits, axis=1))  # gaps[:, r - 1] is between ranks r - 1 and r
    near_tie = np.zeros_like(differs)
    near_tie[:, 1:] |= gaps <= atol
    near_tie[:, :-1] |= gaps <= atol
    ok = ok and bool(np.all(~differs[:, 1:] | near_tie[:, 1:]))
    count = int(differs.sum())
    return ok, float(count), count / differs.size


def compare_array(
    name: str,
    actual: ArrayLike | float | int,
    reference_npz: str | Path | Mapping[str, np.ndarray],
    case_json: str | Path | dict,
) -> tuple[bool, float, float]:
    """Check one output against the reference under its `case.json` rule -> (ok, max_abs, max_rel).

    `actual` is the full tensor (for sampled references too). See the module docstring for what
    max_abs and max_rel mean per rule. The instance arrays go through `compare_instances`.
    """
    npz = _load_npz(reference_npz)
    spec = array_spec(name, npz, case_json)
    tolerance = spec["tolerance"]
    actual_np = _as_numpy(actual)
    if list(actual_np.shape) != list(spec["shape"]):
        return False, float("inf"), float("inf")

    if isinstance(tolerance, dict):
        if spec["storage"] == "sampled":
            indices = npz[f"{name}.sampled_indices"]
            ref = npz[f"{name}.sampled_values"]
            ok, max_abs, max_rel = _float_rule(actual_np.reshape(-1)[indices], ref, tolerance)
            # Statistics of the whole tensor catch errors away from the sampled positions.
            full = actual_np.astype(np.float64)
            mean_err = abs(float(full.mean()) - float(npz[f"{name}.mean"]))
            std_err = abs(float(full.std()) - float(npz[f"{name}.std"]))
            ok = ok and mean_err <= tolerance["atol_p99"] and std_err <= tolerance["atol_p99"]
            return ok, max_abs, max_rel
        return _float_rule(actual_np, reference_array(name, npz), tolerance)

    rule = tolerance.lower()
    if name in INSTANCE_ARRAYS or rule.startswith("match instances") or rule.startswith("same set"):
        raise ValueError(f"{name} is compared as a set: use compare_instances")
    ref = reference_array(name, npz)
    if rule == "exact":
        differs = actual_np.astype(ref.dtype) != ref
        return _count_rule(differs, 0)
    if rule.startswith("bool: at most max(4, 1e-4"):
        differs = actual_np.astype(bool) != ref
        return _count_rule(differs, max(4.0, 1e-4 * ref.size))
    if rule.startswith("at most 1e-3 of pixels"):
        differs = actual_np.astype(ref.dtype) != ref
        return _count_rule(differs, 1e-3 * ref.size)
    if rule.startswith("exact at pixels where post.sem_seg_top2_margin"):
        margin = _top2_margin(npz)
        differs = (actual_np.astype(ref.dtype) != ref) & (margin > 1e-3)
        return _count_rule(differs, 0)
    if "segment map equal on at least 99.9%" in rule:
        differs = actual_np.astype(ref.dtype) != ref
        return _count_rule(differs, 1e-3 * ref.size)
    if rule.startswith("rank 1 exact"):
        logit_tol = array_spec("captioning.step_top10_logits", npz, case_json)["tolerance"]["atol_max"]
        return _top10_ids_rule(actual_np.astype(ref.dtype), ref, npz, logit_tol)
    raise ValueError(f"{name}: unknown tolerance rule {tolerance!r}")


def compare_segments_info(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    """Panoptic segments_info equality on the reference fields id, category_id and isthing."""
    fields = ("id", "category_id", "isthing")

    def key(info: dict[str, Any]) -> tuple:
        return tuple(int(info[f]) if f != "isthing" else bool(info[f]) for f in fields)

    return [key(s) for s in actual] == [key(s) for s in expected]


def compare_instances(
    actual: Mapping[str, ArrayLike],
    reference_npz: str | Path | Mapping[str, np.ndarray],
    case_json: str | Path | dict,
    boundary_gap: float | None = None,
) -> tuple[bool, float, float]:
    """Instance results as a set keyed by (query index, class) -> (ok, max score error, mask fraction).

    `actual` holds "query_indices" (K,), "labels" (K,), "scores" (K,) and "masks" (K, H, W) bool, in
    any order. Matching instances must have masks differing on at most 1e-4 of their pixels and
    scores within the float rule of `post.instances_scores`. One key missing on each side is
    tolerated when `boundary_gap` (the reference's `instance_topk_boundary_gap`) is below 1e-4.
    """
    npz = _load_npz(reference_npz)
    score_tol = array_spec("post.instances_scores", npz, case_json)["tolerance"]
    ref_queries = npz["post.instances_query_index"].tolist()
    ref_keys = list(zip(ref_queries, npz["post.instances_pred_classes"].tolist(), strict=True))
    act_queries = _as_numpy(actual["query_indices"]).tolist()
    act_keys = list(zip(act_queries, _as_numpy(actual["labels"]).tolist(), strict=True))
    ref_index = {k: i for i, k in enumerate(ref_keys)}
    act_index = {k: i for i, k in enumerate(act_keys)}
    missing = set(ref_keys) - set(act_keys)
    extra = set(act_keys) - set(ref_keys)
    swap_allowed = boundary_gap is not None and boundary_gap < 1e-4
    ok = len(act_keys) == len(ref_keys) and (
        (not missing and not extra) or (swap_allowed and len(missing) == 1 and len(extra) == 1)
    )
    common = [k for k in ref_keys if k in act_index]
    if not common:
        return ok and not ref_keys, 0.0, 0.0
    ref_rows = [ref_index[k] for k in common]
    act_rows = [act_index[k] for k in common]
    ref_masks = npz["post.instances_pred_masks"][ref_rows]
    act_masks = _as_numpy(actual["masks"]).astype(bool)[act_rows]
    mask_fraction = float((ref_masks != act_masks).mean())
    ref_scores = npz["post.instances_scores"][ref_rows]
    act_scores = _as_numpy(actual["scores"])[act_rows]
    scores_ok, score_err, _ = _float_rule(act_scores, ref_scores, score_tol)
    ok = ok and scores_ok and mask_fraction <= 1e-4
    return ok, score_err, mask_fraction
