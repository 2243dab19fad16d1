"""Check the implementation against a golden reference case folder.

    python -m models.reference_check CASE_DIR [--checkpoint PATH] [--tasks seg,grounding,...]

An OpenSeeD case folder (`golden.json` + `golden.npz`) is checked by `models.reference_check_openseed`.

A case folder holds `case.json`, the input image and one npz per task (seg, grounding, captioning,
retrieval, postproc). The model config comes from `keys.json` in the case's parent folder (or from
the checkpoint's shapes); without `--checkpoint` the deterministic reference checkpoint is made from
that `keys.json` into a cache folder. Every array stored in each npz is computed and compared with
the case's tolerance; one line per array is printed (name, max abs error, max rel error, PASS/FAIL)
and the exit status is non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import load_checkpoint, read_state_dict, reference_checkpoint
from models.configs import config_names, get_config
from models.decoders.xdecoder import HeadOutput, class_logits, grounding_similarity
from models.language.prompts import prompts_for
from models.language.tokenizer import ClipTokenizer
from models.postprocess import (
    caption_from_tokens,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    retrieval_scores,
    semantic_inference,
)
from models.preprocess import ImageBatch, batch_images, load_image, resize_image
from models.reference_compare import INSTANCE_ARRAYS, compare_array, compare_instances, compare_segments_info
from models.xdecoder import ImageFeatures, XDecoderModel

TASK_ORDER = ("seg", "grounding", "captioning", "retrieval", "postproc")
DEFAULT_CACHE = Path(
    os.environ.get("OPENSET_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "tests")
)

Arrays = dict[str, Any]


# ---------------------------------------------------------------------------- config detection


def _shape_facts(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, bool, int]:
    """(embed dim, num queries, has dw convs, blocks in stage 2) of a flat key -> shape map."""
    embed = shapes["backbone.patch_embed.proj.weight"][0]
    queries = shapes["sem_seg_head.predictor.query_feat.weight"][0]
    has_dw = "backbone.layers.0.blocks.0.dw1.weight" in shapes
    depth2 = len({k.split(".")[4] for k in shapes if k.startswith("backbone.layers.2.blocks.")})
    return embed, queries, has_dw, depth2


def detect_config(shapes: dict[str, tuple[int, ...]]) -> str:
    """The released config whose backbone width, depth, variant and query count match `shapes`."""
    facts = _shape_facts(shapes)
    for name in config_names():
        cfg = get_config(name)
        if not cfg.released:
            continue
        b = cfg.backbone
        if (b.embed_dim, cfg.decoder.num_queries, b.variant == "focal_dw", b.depths[2]) == facts:
            return name
    raise ValueError(f"no known config matches the checkpoint (embed, queries, dw, depth) = {facts}")


def manifest_shapes(keys_json: Path) -> dict[str, tuple[int, ...]]:
    entries = json.loads(keys_json.read_text())["entries"]
    return {e["key"]: tuple(e["shape"]) for e in entries}


# ---------------------------------------------------------------------------- shared stages


def _image_arrays(batch: ImageBatch, image: np.ndarray, rule: Any, features: ImageFeatures) -> Arrays:
    out: Arrays = {"input_image_resized_uint8": resize_image(image, rule), "input_tensor": batch.tensor}
    for name, value in features.backbone.items():
        out[f"backbone.{name}"] = value
    out["pixel_decoder.transformer_encoder_features"] = features.encoder_features
    for i, feat in enumerate(features.multi_scale):
        out[f"pixel_decoder.multi_scale_features.{i}"] = feat
    out["pixel_decoder.mask_features"] = features.memory.mask_features
    return out


def _decoder_arrays(record: list[HeadOutput], text: torch.Tensor, logit_scale: torch.Tensor) -> Arrays:
    out: Arrays = {}
    for k, head in enumerate(record):
        out[f"decoder.layer{k}.pred_logits"] = class_logits(head.embeds, text, logit_scale)
        out[f"decoder.layer{k}.pred_masks"] = head.masks
        out[f"decoder.layer{k}.attn_mask_head0"] = head.attn_mask[0]
    last = record[-1]
    out["final.pred_logits"] = out[f"decoder.layer{len(record) - 1}.pred_logits"]
    out["final.pred_masks"] = last.masks
    out["final.pred_captions"] = last.embeds
    return out


def _segmentation_post(
    mask_cls: torch.Tensor, masks: torch.Tensor, thing_flags: list[bool], thresholds: dict
) -> tuple[Arrays, dict]:
    """The three inferences on (Q, C+1) logits and (Q, H, W) mask logits at the original size."""
    out: Arrays = {"post.mask_pred_original_size": masks}
    sem = semantic_inference(mask_cls, masks)
    out["post.sem_seg"] = sem
    out["post.sem_seg_argmax"] = sem.argmax(dim=0).to(torch.uint8)
    top2 = sem.topk(2, dim=0).values if sem.shape[0] > 1 else None
    if top2 is not None:
        out["post.sem_seg_top2_margin"] = (top2[0] - top2[1]).half()
    extras = {}
    obj = thresholds.get("object_mask_threshold", 0.8)
    overlap = thresholds.get("overlap_threshold", 0.8)
    pan, info = panoptic_inference(mask_cls, masks, thing_flags, obj, overlap)
    out["post.panoptic_seg"] = pan
    extras["panoptic_segments_info"] = info
    pan0, info0 = panoptic_inference(mask_cls, masks, thing_flags, 0.0, overlap)
    out["post.panoptic_seg_thr0"] = pan0
    extras["panoptic_thr0_segments_info"] = info0
    inst = instance_inference(mask_cls, masks, thing_flags, top_k=thresholds.get("test_topk_per_image", 100))
    out["post.instances_pred_boxes"] = torch.zeros(len(inst["scores"]), 4)
    extras["instances"] = inst
    return out, extras


# ---------------------------------------------------------------------------- tasks


class CaseRunner:
    """Runs each task of a case folder and returns the arrays named as in its npz files."""

    def __init__(self, model: XDecoderModel, case_dir: Path) -> None:
        self.model = model
        self.case_dir = case_dir
        self.case = json.loads((case_dir / "case.json").read_text())
        self.image = load_image(str(case_dir / self.case["input"]["image"]))
        self.tokenizer = ClipTokenizer()
        self.text = model.text_encoder

    def _encode(self, task: str) -> tuple[ImageBatch, ImageFeatures, Arrays]:
        rule = self.model.cfg.resize[task]
        batch = batch_images([self.image], rule)
        features = self.model.encode_images(batch.tensor)
        return batch, features, _image_arrays(batch, self.image, rule, features)

    def _mask_logits(self, masks: torch.Tensor, batch: ImageBatch) -> torch.Tensor:
        return resize_mask_logits(masks, batch.padded_sizes[0], batch.image_sizes[0], batch.original_sizes[0])

    def seg(self, spec: dict) -> tuple[Arrays, dict]:
        names = spec.get("names_with_background") or [*spec["vocabulary"], "background"]
        ids, mask = self.tokenizer.encode(prompts_for(names[0]))
        prompt = self.text.eos_features(ids)
        out: Arrays = {
            "text.first_class_prompt_input_ids": ids,
            "text.first_class_prompt_attention_mask": mask,
            "text.first_class_prompt_embeddings": prompt / (prompt.norm(dim=-1, keepdim=True) + 1e-7),
        }
        text = self.text.encode_class_names(names, self.tokenizer)
        out["text.class_embeddings"] = text
        out["text.logit_scale"] = self.text.logit_scale
        batch, features, image_arrays = self._encode("segmentation")
        out.update(image_arrays)
        record: list[HeadOutput] = []
        self.model.decoder.forward_seg(features.memory, record=record)
        out.update(_decoder_arrays(record, text, self.text.logit_scale))
        things = set(spec.get("thing_class_indices", range(len(names) - 1)))
        flags = [c in things for c in range(len(names) - 1)]
        masks = self._mask_logits(record[-1].masks[0], batch)
        post, extras = _segmentation_post(
            out["final.pred_logits"][0], masks, flags, spec.get("thresholds", {})
        )
        out.update(post)
        return out, extras

    def grounding(self, spec: dict) -> tuple[Arrays, dict]:
        phrases = [t[0] if isinstance(t, list) else t for t in spec.get("texts_input", [spec.get("phrase")])]
        ids, mask = self.tokenizer.encode(phrases)
        token_emb = self.text.token_features(ids)
        class_emb = self.text.eos_features(ids)
        tokens = token_emb[mask.bool()]  # (T, D), phrases concatenated
        out: Arrays = {
            "text.input_ids": ids,
            "text.attention_mask": mask,
            "text.token_emb": token_emb,
            "text.class_emb": class_emb,
            "text.grounding_tokens": tokens[:, None],
        }
        batch, features, image_arrays = self._encode("grounding")
        out.update(image_arrays)
        record: list[HeadOutput] = []
        self.model.decoder.forward_grounding(features.memory, [tokens], record=record)
        background = self.text.encode_class_names(["background"], self.tokenizer)
        out.update(_decoder_arrays(record, background, self.text.logit_scale))
        q = self.model.cfg.decoder.num_queries
        head = record[-1]
        scores = grounding_similarity(head.embeds[0, q:], class_emb, self.text.logit_scale)
        matched = scores.argmax(dim=0)
        selected = head.masks[0, q:][matched]
        logits = self._mask_logits(selected, batch)
        out.update(
            {
                "grounding.scores": scores,
                "grounding.matched_query": matched,
                "grounding.selected_mask_lowres": selected,
                "grounding.mask_logits": logits,
                "grounding.mask_binary": (logits.sigmoid() > 0.5).to(torch.uint8),
            }
        )
        return out, {}

    def captioning(self, spec: dict) -> tuple[Arrays, dict]:
        _, features, out = self._encode("captioning")
        record: dict = {}
        tokens = self.model.greedy_caption(features, spec.get("steps", 50), early_stop=False, record=record)
        out["captioning.tokens_input_per_step"] = torch.stack(record["tokens_input_per_step"])[:, 0]
        out["captioning.final_tokens"] = tokens[0]
        out["captioning.step_top10_token_ids"] = torch.stack(record["step_top10_token_ids"])[:, 0]
        out["captioning.step_top10_logits"] = torch.stack(record["step_top10_logits"])[:, 0]
        for key in (
            "step0_text_token_features",
            "step0_first_layer_caption_features",
            "step0_last_layer_caption_features",
        ):
            out[f"captioning.{key}"] = record[key]
        return out, {"captioning_text": caption_from_tokens(tokens[0], self.tokenizer)}

    def retrieval(self, spec: dict) -> tuple[Arrays, dict]:
        _, features, out = self._encode("retrieval")
        head, _ = self.model.decoder.forward_seg(features.memory)
        ids, _ = self.tokenizer.encode(spec["captions"])
        text = self.text.eos_features(ids)
        decoder = head.embeds[:, -1]
        backbone = self.model.backbone_embedding(features)
        scores = retrieval_scores(decoder, backbone, text)
        out.update(
            {
                "retrieval.text_input_ids": ids,
                "retrieval.text_embeds": text,
                "retrieval.image_embed_decoder": decoder,
                "retrieval.image_embed_backbone": backbone,
                "final.pred_captions": head.embeds,
                "retrieval.scores_decoder": _cos(decoder, text),
                "retrieval.scores_backbone": _cos(backbone, text),
                "retrieval.scores": scores,
            }
        )
        ranking = scores[0].argsort(descending=True, stable=True).tolist()
        return out, {"ranking_best_first": ranking}

    def postproc(self, spec: dict) -> tuple[Arrays, dict]:
        npz = np.load(self.case_dir / spec["file"])
        mask_cls = torch.from_numpy(npz["input.mask_cls"])
        lowres = torch.from_numpy(npz["input.mask_pred_lowres"])
        padded, image, output = (
            tuple(int(v) for v in npz[f"input.{k}_size_hw"]) for k in ("padded", "image", "output")
        )
        masks = resize_mask_logits(lowres, padded, image, output)
        things = set(spec.get("thing_class_indices", range(spec["num_classes"])))
        flags = [c in things for c in range(spec["num_classes"])]
        out, extras = _segmentation_post(mask_cls, masks, flags, spec.get("thresholds", {}))
        for key in ("mask_cls", "mask_pred_lowres", "image_size_hw", "padded_size_hw", "output_size_hw"):
            out[f"input.{key}"] = npz[f"input.{key}"]
        return out, extras


def _cos(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine without epsilon (the retrieval evaluator's normalisation): (B, D), (N, D) -> (B, N)."""
    return (image / image.norm(dim=-1, keepdim=True)) @ (text / text.norm(dim=-1, keepdim=True)).T


# ---------------------------------------------------------------------------- comparison


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def compare_task(
    task: str, spec: dict, arrays: Arrays, extras: dict, case_dir: Path, case: dict
) -> list[tuple]:
    """(name, ok, max_abs, max_rel) for every array of the task's npz, plus the JSON-level checks."""
    npz = np.load(case_dir / spec["file"])
    rows = []
    instance_done = False
    for name, array_spec in spec["arrays"].items():
        rule = array_spec["tolerance"]
        is_set_rule = name in INSTANCE_ARRAYS or (
            isinstance(rule, str) and (rule.startswith("match instances") or rule.startswith("same set"))
        )
        if is_set_rule:
            if instance_done:
                continue
            instance_done = True
            gap = spec.get(
                "instance_topk_boundary_gap", spec.get("observations", {}).get("instance_topk_boundary_gap")
            )
            ok, err, frac = compare_instances(extras["instances"], npz, spec, gap)
            rows.append((f"{task}:post.instances_*", ok, err, frac))
            continue
        if name not in arrays:
            rows.append((f"{task}:{name}", False, float("nan"), float("nan")))
            continue
        actual = _to_numpy(arrays[name])
        if list(actual.shape) != list(array_spec["shape"]) and actual.size == int(
            np.prod(array_spec["shape"])
        ):
            actual = actual.reshape(array_spec["shape"])
        ok, max_abs, max_rel = compare_array(name, actual, npz, spec)
        rows.append((f"{task}:{name}", ok, max_abs, max_rel))
    for key in ("panoptic_segments_info", "panoptic_thr0_segments_info"):
        if key in spec and key in extras:
            ok = compare_segments_info(extras[key], spec[key])
            rows.append((f"{task}:{key}", ok, 0.0 if ok else 1.0, 0.0 if ok else 1.0))
    if "ranking_best_first" in spec and "ranking_best_first" in extras:
        ok = extras["ranking_best_first"] == spec["ranking_best_first"]
        rows.append((f"{task}:ranking_best_first", ok, 0.0 if ok else 1.0, 0.0 if ok else 1.0))
    if "captioning_text" in spec and "captioning_text" in extras:
        ok = extras["captioning_text"] == spec["captioning_text"]
        rows.append((f"{task}:captioning_text", ok, 0.0 if ok else 1.0, 0.0 if ok else 1.0))
    return rows


def run_case(case_dir: Path, checkpoint: Path | None, tasks: list[str] | None = None) -> list[tuple]:
    """Build the model, run every task present in the case and compare; returns the result rows."""
    case = json.loads((case_dir / "case.json").read_text())
    keys_json = case_dir.parent / "keys.json"
    if checkpoint is None:
        if not keys_json.is_file():
            raise FileNotFoundError(
                f"no --checkpoint and no {keys_json} to make the reference checkpoint from"
            )
        checkpoint = reference_checkpoint(keys_json, DEFAULT_CACHE)
    if keys_json.is_file():
        name = detect_config(manifest_shapes(keys_json))
    else:
        name = detect_config({k: tuple(v.shape) for k, v in read_state_dict(checkpoint).items()})
    model = XDecoderModel(get_config(name)).eval()
    load_checkpoint(model, checkpoint)
    model.lay_out_caption_step_weights()  # as `Predictor` serves it on a CPU
    runner = CaseRunner(model, case_dir)
    rows = []
    for task in TASK_ORDER:
        spec = case["tasks"].get(task)
        if spec is None or (tasks and task not in tasks):
            continue
        start = time.perf_counter()
        with torch.inference_mode():
            arrays, extras = getattr(runner, task)(spec)
        task_rows = compare_task(task, spec, arrays, extras, case_dir, case)
        for row in task_rows:
            print(_format(row), flush=True)
        print(f"# {task}: {time.perf_counter() - start:.1f} s ({name})", flush=True)
        rows.extend(task_rows)
    return rows


def _format(row: tuple) -> str:
    name, ok, max_abs, max_rel = row
    return f"{name:60s} {max_abs:12.4g} {max_rel:12.4g}  {'PASS' if ok else 'FAIL'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tasks", default="", help=f"comma-separated subset of {','.join(TASK_ORDER)}")
    args = parser.parse_args(argv)
    if (args.case_dir / "golden.json").is_file():  # an OpenSeeD case folder (golden.json + golden.npz)
        from models import reference_check_openseed

        return reference_check_openseed.main(
            [str(args.case_dir)] + (["--checkpoint", str(args.checkpoint)] if args.checkpoint else [])
        )
    tasks = [t for t in args.tasks.split(",") if t] or None
    print(f"{'array':60s} {'max abs':>12s} {'max rel':>12s}  result")
    rows = run_case(args.case_dir, args.checkpoint, tasks)
    failed = [r[0] for r in rows if not r[1]]
    print(
        f"{len(rows) - len(failed)}/{len(rows)} passed" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
