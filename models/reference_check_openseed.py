"""Check OpenSeeD against a golden case folder of the official code (`golden.json` + `golden.npz`).

    python -m models.reference_check CASE_DIR [--checkpoint PATH]

Everything comes from `golden.json` (image, resized size, vocabulary, thing ids) and `keys.json` in
the parent folder; without `--checkpoint` the deterministic reference checkpoint is made from that
manifest into the cache. The model runs once (float32, CPU) and every array stored in the npz is
compared under the bounds of the reference README (section 6); summarised arrays (`NAME@idx`,
`NAME@vals`) are compared at their indices and by the full tensor's mean and std. One line per
array: name, max abs error, mean abs error or count, PASS/FAIL; the exit status is non-zero on any
failure.

Near-tied proposals may be selected in a different order than the official run: per-query arrays are
then compared after aligning our queries to the reference ones through `decoder.topk_proposals`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, reference_checkpoint
from models.language.prompts import prompts_for
from models.language.tokenizer import ClipTokenizer
from models.openseed import OpenSeeDModel, get_openseed_config
from models.pixel_decoders.fpn_encoder import sine_position_embedding
from models.postprocess import resize_mask_logits
from models.postprocess_openseed import (
    boxes_to_original,
    detection_inference,
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from models.preprocess import normalize
from models.reference_check import DEFAULT_CACHE

CONFIG_NAME = "openseed-swint"
VARIANT_PREFIX = "post.panoptic_seg_overlap"  # panoptic stress variants: lowered overlap thresholds


@dataclass(frozen=True)
class Bound:
    """max |x - ref| <= max_abs and, when set, mean |x - ref| <= mean_abs."""

    max_abs: float
    mean_abs: float | None = None


EXACT = Bound(0.0)
# README section 6, most specific rule first.
BOUNDS: list[tuple[str, Bound]] = [
    (r"^input\.tensor$", Bound(1e-5)),
    (r"^text\.(prompt_embeddings|embeddings|logit_scale)$", Bound(1e-5)),
    (r"^backbone\.", Bound(1e-3, 1e-4)),
    (r"pred_masks(_top10)?$|^post\.mask_pred_resized$", Bound(1e-2, 1e-4)),
    (r"pred_logits$", Bound(1e-3)),
    (r"pred_boxes$|^decoder\.references$", Bound(2e-4)),
    (r"^decoder\.(enc_class_logits|topk_scores)$", Bound(5e-5)),
    (r"^decoder\.output_proposals$", Bound(1e-4)),
    (r"^(encoder|pixel_decoder)\.|^decoder\.(src_flatten|.*memory.*)$", Bound(2e-3, 2e-4)),
    (r"^decoder\.(hs|interm_.*|enc_coord_unselected)$", Bound(2e-3)),
    (r"^post\.sem_seg(_max)?$", Bound(5e-3)),
]
EXACT_ARRAYS = (
    "input.image_original_uint8",
    "input.image_resized_uint8",
    "text.input_ids",
    "text.attention_mask",
    "encoder.spatial_shapes",
    "encoder.level_start_index",
    "decoder.spatial_shapes",
)
# Axis of the 300 queries in per-query arrays (aligned through decoder.topk_proposals).
QUERY_AXIS = {
    "decoder.topk_scores": 1,
    "decoder.interm_pred_logits": 1,
    "decoder.interm_pred_boxes": 1,
    "decoder.interm_pred_masks": 1,
    "decoder.hs": 2,
    "decoder.references": 2,
    "decoder.per_layer_pred_boxes": 2,
    "decoder.per_layer_pred_logits": 2,
    "out.pred_logits": 1,
    "out.pred_boxes": 1,
    "out.pred_masks": 1,
    "post.mask_pred_resized": 0,
}

Row = tuple[str, bool, float, str]


def bound_of(name: str) -> Bound:
    for pattern, bound in BOUNDS:
        if re.search(pattern, name):
            return bound
    raise KeyError(f"no bound for {name}")


# ---------------------------------------------------------------------------- inputs


def resize_bicubic(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> (h, w, 3) with PIL bicubic, as the official OpenSeeD transform."""
    if tuple(image.shape[:2]) == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BICUBIC))


def input_tensor(resized: np.ndarray, padded_hw: tuple[int, int]) -> torch.Tensor:
    """Normalised (1, 3, Hp, Wp), zero-padded bottom/right after normalisation."""
    x = normalize(resized)
    out = torch.zeros(1, 3, *padded_hw)
    out[0, :, : x.shape[1], : x.shape[2]] = x
    return out


class EncoderRecorder:
    """Forward hooks on the pixel decoder's official submodules: the encoder inputs after
    `input_proj.i`, each encoder layer's output and the shapes the layers receive."""

    def __init__(self, pixel_decoder: torch.nn.Module) -> None:
        self.arrays: dict[str, torch.Tensor] = {}
        self.handles = []
        for i, proj in enumerate(pixel_decoder.input_proj):
            self.handles.append(proj.register_forward_hook(self._store(f"encoder.input_src{i}")))
        layers = pixel_decoder.transformer.encoder.layers
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._store(f"encoder.layer{i}_out")))
        self.num_layers = len(layers)

    def _store(self, name: str):
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            self.arrays[name] = output

        return hook

    def finish(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        out = dict(self.arrays)
        srcs = [out[k] for k in sorted(k for k in out if k.startswith("encoder.input_src"))]
        for i, src in enumerate(srcs):
            out[f"encoder.pos{i}"] = sine_position_embedding(
                (src.shape[0], *src.shape[-2:]), src.shape[1] // 2, None, src.device
            )
        shapes = torch.tensor([list(s.shape[-2:]) for s in srcs], dtype=torch.long)
        out["encoder.spatial_shapes"] = shapes
        out["encoder.level_start_index"] = torch.cat(
            (shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1])
        )
        out["encoder.memory"] = out.get(f"encoder.layer{self.num_layers - 1}_out")
        return out


# ---------------------------------------------------------------------------- the run


def run_model(model: OpenSeeDModel, case: dict, npz: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every array of the case computed by our implementation (names as in the npz), plus the
    panoptic segments_info and the instance / detection sets."""
    res = case["results"]
    original = npz["input.image_original_uint8"]
    original_hw = tuple(res["original_hw"])
    resized_hw = tuple(res["resized_hw"])
    padded_hw = tuple(res["padded_hw"])
    names = list(res["vocab"])
    thing_flags = [c in set(res["thing_ids"]) for c in range(len(names))]
    post_cfg = model.cfg.postprocess

    arrays: dict[str, Any] = {"input.image_original_uint8": original}
    resized = resize_bicubic(original, resized_hw)
    arrays["input.image_resized_uint8"] = resized
    images = input_tensor(resized, padded_hw)
    arrays["input.tensor"] = images

    tokenizer = ClipTokenizer()
    text = model.text_encoder
    prompts = [p for name in names for p in prompts_for(name)]
    ids, attention = tokenizer.encode(prompts, context_length=model.cfg.text.context_length)
    per_prompt = text.eos_features(ids)
    arrays["text.input_ids"] = ids
    arrays["text.attention_mask"] = attention
    arrays["text.prompt_embeddings"] = per_prompt / (per_prompt.norm(dim=-1, keepdim=True) + 1e-7)
    class_embeddings = model.encode_texts(names, tokenizer)
    arrays["text.embeddings"] = class_embeddings
    arrays["text.logit_scale"] = text.logit_scale

    recorder = EncoderRecorder(model.sem_seg_head.pixel_decoder)
    record: dict[str, torch.Tensor] = {}
    out = model(images, class_embeddings, record=record)
    arrays.update(recorder.finish())
    arrays.update(record)
    arrays.update({f"out.{k}": v for k, v in out.items()})

    logits, boxes, masks = out["pred_logits"][0], out["pred_boxes"][0], out["pred_masks"][0]
    top10 = logits.sigmoid().max(dim=-1).values.topk(10).indices
    arrays["out.pred_masks_top10_queries"] = top10
    arrays["out.pred_masks_top10"] = masks[top10]

    resized_masks = resize_mask_logits(masks, padded_hw, resized_hw, original_hw, upsample="bilinear")
    arrays["post.mask_pred_resized"] = resized_masks
    sem = semantic_inference(logits, resized_masks, post_cfg.temperature)
    arrays["post.sem_seg"] = sem
    arrays["post.sem_seg_max"], arrays["post.sem_seg_argmax"] = sem.max(dim=0)
    extras: dict[str, Any] = {}
    variants = set(res.get("panoptic_variants_segments_info", {}))
    variants |= {n[len(VARIANT_PREFIX) :] for n in npz.files if n.startswith(VARIANT_PREFIX)}
    runs = [(post_cfg.overlap_threshold, "")] + [(float(v), f"_overlap{v}") for v in sorted(variants)]
    for threshold, key in runs:
        pan, info = panoptic_inference(
            logits,
            resized_masks,
            thing_flags,
            post_cfg.object_mask_threshold,
            threshold,
            post_cfg.temperature,
        )
        arrays[f"post.panoptic_seg{key}"] = pan
        extras[f"segments_info{key}"] = info
    boxes_xyxy = boxes_to_original(boxes, padded_hw, resized_hw, original_hw)
    extras["instances"] = instance_inference(logits, resized_masks, boxes_xyxy, thing_flags, post_cfg.top_k)
    # Task 'det' runs the same network; only its postprocessing differs.
    extras["detections"] = detection_inference(logits, boxes_xyxy, post_cfg.top_k)
    return arrays, extras


# ---------------------------------------------------------------------------- comparison


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def query_alignment(
    ours: np.ndarray, ref: np.ndarray, ref_scores: np.ndarray
) -> tuple[Row, np.ndarray | None]:
    """The topk_proposals row and, when the sets agree, `perm` with ours[perm[i]] = ref[i]."""
    ours, ref = ours.reshape(-1), ref.reshape(-1)
    if len(ours) != len(ref) or set(ours.tolist()) != set(ref.tolist()):
        missing = len(set(ref.tolist()) - set(ours.tolist()))
        return ("decoder.topk_proposals", False, float(missing), "different set"), None
    position = {int(p): i for i, p in enumerate(ours)}
    perm = np.array([position[int(p)] for p in ref])
    # Order may differ only between entries whose reference scores differ by < 1e-5.
    moved = np.nonzero(perm != np.arange(len(perm)))[0]
    scores = ref_scores.reshape(-1)
    ok = all(abs(float(scores[perm[i]]) - float(scores[i])) < 1e-5 for i in moved)
    return ("decoder.topk_proposals", ok, float(len(moved)), f"{len(moved)} swapped"), perm


def _reference(name: str, npz: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """(indices or None for a full array, reference values)."""
    if name in npz.files:
        return None, npz[name]
    return npz[f"{name}@idx"], npz[f"{name}@vals"]


def compare_float(name: str, actual: np.ndarray, npz: Any, meta: dict) -> Row:
    bound = bound_of(name)
    indices, ref = _reference(name, npz)
    if list(actual.shape) != list(meta["shape"]):
        return name, False, float("inf"), f"shape {list(actual.shape)} != {meta['shape']}"
    values = actual.reshape(-1)[indices] if indices is not None else actual
    values, ref = values.astype(np.float64).reshape(-1), ref.astype(np.float64).reshape(-1)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(values)) or not np.array_equal(values[~finite], ref[~finite]):
        return name, False, float("inf"), "non-finite entries differ"
    diff = np.abs(values[finite] - ref[finite]) if finite.any() else np.zeros(1)
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    ok = max_abs <= bound.max_abs and (bound.mean_abs is None or mean_abs <= bound.mean_abs)
    detail = f"mean {mean_abs:.3g}"
    if indices is not None:  # summarised: the full tensor's statistics too
        full = actual.astype(np.float64)
        full = full[np.isfinite(full)]
        stat_tol = bound.mean_abs if bound.mean_abs is not None else bound.max_abs
        d_mean, d_std = abs(full.mean() - meta["mean"]), abs(full.std() - meta["std"])
        ok = ok and d_mean <= stat_tol and d_std <= stat_tol
        detail += f" dmean {d_mean:.2g} dstd {d_std:.2g}"
    return name, ok, max_abs, detail


def compare_exact(name: str, actual: np.ndarray, ref: np.ndarray, min_equal: float = 1.0) -> Row:
    if actual.shape != ref.shape:
        return name, False, float("inf"), f"shape {list(actual.shape)} != {list(ref.shape)}"
    differs = int((actual.astype(np.int64) != ref.astype(np.int64)).sum())
    ok = differs == 0 if min_equal >= 1.0 else 1 - differs / max(ref.size, 1) >= min_equal
    return name, ok, float(differs), f"{differs} of {ref.size} differ"


def _segments(info: list[dict]) -> list[tuple[int, int, bool]]:
    return [(int(s["id"]), int(s["category_id"]), bool(s["isthing"])) for s in info]


SET_KEYS = {  # reference arrays of the instance ('seg') and detection ('det') sets
    "post.inst": ("post.inst_query_index", "post.inst_classes", "post.inst_scores", "post.inst_boxes_xyxy"),
    "det": ("det.query_index", "det.classes", "det.scores", "det.boxes_xyxy"),
}


def compare_sets(
    prefix: str, found: dict[str, torch.Tensor], npz: Any, ref_query_of: np.ndarray, masks_hw: tuple[int, int]
) -> list[Row]:
    """Instance (`post.inst_*`) or detection (`det.*`) sets keyed by (query, class): same keys, then
    scores, boxes and (instances) binary masks of the matching entries."""
    queries, classes, scores, boxes = SET_KEYS[prefix]
    ref_keys = list(zip(npz[queries].tolist(), npz[classes].tolist(), strict=True))
    ours = [int(ref_query_of[q]) for q in _np(found["query_indices"]).tolist()]
    our_keys = list(zip(ours, _np(found["labels"]).tolist(), strict=True))
    same = sorted(ref_keys) == sorted(our_keys) and len(set(our_keys)) == len(our_keys)
    rows: list[Row] = [
        (
            f"{prefix}:(query,class) set",
            same,
            float(len(set(ref_keys) ^ set(our_keys))),
            f"{len(ref_keys)} entries",
        )
    ]
    position = {k: i for i, k in enumerate(our_keys)}
    ref_rows = [i for i, k in enumerate(ref_keys) if k in position]
    our_rows = [position[ref_keys[i]] for i in ref_rows]
    score_err = float(np.abs(_np(found["scores"])[our_rows] - npz[scores][ref_rows]).max(initial=0.0))
    rows.append((f"{prefix}:scores", same and score_err <= 1e-4, score_err, ""))
    box_err = float(np.abs(_np(found["boxes"])[our_rows] - npz[boxes][ref_rows]).max(initial=0.0))
    rows.append((f"{prefix}:boxes_xyxy", same and box_err <= 0.05, box_err, "px"))
    if prefix == "post.inst":
        h, w = masks_hw
        packed = npz["post.inst_masks_packed"][ref_rows]
        ref_masks = np.unpackbits(packed, axis=1)[:, : h * w].reshape(-1, h, w).astype(bool)
        our_masks = _np(found["masks"])[our_rows].astype(bool)
        differs = int((ref_masks != our_masks).sum())
        frac = 1 - differs / max(ref_masks.size, 1)
        rows.append(("post.inst:masks", same and frac >= 0.9999, float(differs), f"{differs} px differ"))
    return rows


def compare_case(arrays: dict[str, Any], extras: dict[str, Any], case: dict, npz: Any) -> list[Row]:
    meta_all = case["arrays"]
    res = case["results"]
    rows: list[Row] = []
    perm = None
    if "decoder.topk_proposals" in meta_all:
        row, perm = query_alignment(
            _np(arrays["decoder.topk_proposals"]), npz["decoder.topk_proposals"], npz["decoder.topk_scores"]
        )
        rows.append(row)
    num_queries = len(perm) if perm is not None else int(_np(arrays["out.pred_logits"]).shape[1])
    ref_query_of = np.arange(num_queries)
    if perm is not None:
        ref_query_of[perm] = np.arange(num_queries)  # our query q is reference query ref_query_of[q]

    for name, meta in meta_all.items():
        if name == "decoder.topk_proposals" or name.startswith(("post.inst_", "det.")):
            continue
        if name not in arrays or arrays[name] is None:
            rows.append((name, False, float("nan"), "not computed"))
            continue
        actual = _np(arrays[name])
        if perm is not None and name in QUERY_AXIS:
            actual = np.take(actual, perm, axis=QUERY_AXIS[name])
        if name == "out.pred_masks_top10_queries":
            rows.append(compare_exact(name, ref_query_of[actual], npz[name]))
        elif name in EXACT_ARRAYS:
            rows.append(compare_exact(name, actual, npz[name]))
        elif name == "post.sem_seg_argmax":
            rows.append(compare_exact(name, actual, npz[name], min_equal=0.9999))
        elif name == "post.panoptic_seg":
            rows.append(compare_exact(name, actual, npz[name]))
        elif name.startswith("post.panoptic_seg_overlap"):
            rows.append(compare_exact(name, actual, npz[name], min_equal=0.999))
        else:
            rows.append(compare_float(name, actual, npz, meta))

    ok = _segments(extras["segments_info"]) == _segments(res["panoptic_segments_info"])
    rows.append(
        ("post.panoptic segments_info", ok, float(not ok), f"{len(extras['segments_info'])} segments")
    )
    for variant, expected in res.get("panoptic_variants_segments_info", {}).items():
        ours = extras.get(f"segments_info_overlap{variant}")
        ok = ours is not None and _segments(ours) == _segments(expected)
        rows.append(
            (f"post.panoptic_overlap{variant} segments_info", ok, float(not ok), f"{len(expected)} segments")
        )
    masks_hw = tuple(res["original_hw"])
    if "post.inst_query_index" in npz.files:
        rows.extend(compare_sets("post.inst", extras["instances"], npz, ref_query_of, masks_hw))
    if "det.query_index" in npz.files:
        rows.extend(compare_sets("det", extras["detections"], npz, ref_query_of, masks_hw))
    return rows


# ---------------------------------------------------------------------------- entry point


def run_case(case_dir: Path, checkpoint: Path | None) -> list[Row]:
    case = json.loads((case_dir / "golden.json").read_text())
    npz = np.load(case_dir / "golden.npz")
    if checkpoint is None:
        keys_json = case_dir.parent / "keys.json"
        if not keys_json.is_file():
            raise FileNotFoundError(
                f"no --checkpoint and no {keys_json} to make the reference checkpoint from"
            )
        checkpoint = reference_checkpoint(keys_json, DEFAULT_CACHE)
    model = OpenSeeDModel(get_openseed_config(CONFIG_NAME)).eval()
    load_checkpoint(model, checkpoint)
    start = time.perf_counter()
    with torch.inference_mode():
        arrays, extras = run_model(model, case, npz)
    rows = compare_case(arrays, extras, case, npz)
    for row in rows:
        print(format_row(row), flush=True)
    print(f"# {time.perf_counter() - start:.1f} s ({CONFIG_NAME})", flush=True)
    return rows


def format_row(row: Row) -> str:
    name, ok, max_abs, detail = row
    return f"{name:48s} {max_abs:12.4g}  {detail:36s} {'PASS' if ok else 'FAIL'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check OpenSeeD against a golden case folder.")
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args(argv)
    print(f"{'array':48s} {'max abs':>12s}  {'detail':36s} result")
    rows = run_case(args.case_dir, args.checkpoint)
    failed = [r[0] for r in rows if not r[1]]
    print(
        f"{len(rows) - len(failed)}/{len(rows)} passed" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
