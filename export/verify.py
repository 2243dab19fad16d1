"""Parity of an export with PyTorch (`openset export verify DIR`).

1. Every graph against the same torch module (`export.graphs`, with the model's own decoder code) on
   seeded inputs at each checked image size: max |onnx - torch| per output, which passes when it is
   at most `atol + rtol * max|torch|`.
2. With `--reference CASE_DIR` (a golden case of `../shared/reference/`, e.g. the Focal-T case_a),
   the exported model runs the case's captioning and retrieval inputs (224 x 224) and its outputs are
   compared with the golden arrays under the case's own tolerances (`models.reference_compare`).

OpenSeeD and Mask2Former exports (`export.families`) get check 1 against their torch model, rebuilt
from the manifest's config and the checkpoint. For `openseed_decoder` the selected proposals
(`topk_indices`) must be the same set as torch's, except for swaps between near-ties (proposal
scores within the tolerance of the k-th score); the per-query outputs are compared query by query
after matching the ONNX queries to torch's by their proposal, so a reordering of near-equal scores
is not an error (queries without a match are left out and counted).

One line per comparison; the exit status is non-zero when any fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.graphs import graph_specs
from export.manifest import Manifest, read_manifest
from export.onnx_graphs import example_inputs
from export.runtime import ExportedModel, OrtRunner, load_exported
from models.postprocess import retrieval_scores
from models.predictor import build_model
from models.preprocess import padded_size
from models.reference_compare import compare_array

ATOL = 1e-4
RTOL = 1e-3


@dataclass
class Check:
    """One compared output: `name` (graph:output@size or case:array), errors and verdict."""

    name: str
    max_abs: float
    scale: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.name:<48} max_abs {self.max_abs:.3e}  max|ref| {self.scale:.3e}{note}  {verdict}"


def output_check(tag: str, ref: np.ndarray, got: np.ndarray) -> Check:
    """max |got - ref|, passing at `ATOL + RTOL * max|ref|`; a shape mismatch fails."""
    if got.shape != ref.shape:
        return Check(f"{tag} shape {got.shape}", float("inf"), 0.0, False)
    err = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return Check(tag, err, scale, err <= ATOL + RTOL * scale)


def check_sizes(model_sizes: list[list[int]], dynamic: bool, base: tuple[int, int]) -> list[tuple[int, int]]:
    """Declared sizes of a fixed export; for a dynamic one, `base` and a wider, non-square size."""
    if not dynamic:
        return [(h, w) for h, w in model_sizes]
    h, w = base
    return [(h, w), (h - 64 if h > 96 else h, w + 64)]


def compare_graphs(
    exported: ExportedModel, model: torch.nn.Module, sizes: list[tuple[int, int]], seed: int
) -> list[Check]:
    """Every graph's outputs against torch at each size (seeded inputs made by the torch model)."""
    checks = []
    for k, size in enumerate(sizes):
        inputs = example_inputs(model, size, seed=seed)
        for spec in graph_specs(model, dynamic_size=exported.manifest.dynamic):
            if spec.name == "text_encoder" and k > 0:
                continue  # no image input: checked once
            feeds = inputs[spec.name]
            with torch.no_grad():
                expected = spec.module.eval()(*(feeds[name] for name in spec.inputs))
            expected = expected if isinstance(expected, tuple) else (expected,)
            graph_size = None if spec.name == "text_encoder" else size
            actual = exported.run(spec.name, graph_size, {k: v.numpy() for k, v in feeds.items()})
            for name, ref in zip(spec.outputs, expected, strict=True):
                tag = f"{spec.name}:{name}" + ("" if graph_size is None else f"@{size[0]}x{size[1]}")
                checks.append(output_check(tag, ref.numpy(), actual[name]))
    return checks


def compare_family_graphs(
    directory: Path, manifest: Manifest, model: torch.nn.Module, sizes: list[tuple[int, int]], seed: int
) -> list[Check]:
    """Check 1 for an OpenSeeD / Mask2Former export (`export.families`), in ONNX Runtime on CPU."""
    from export.families import FAMILIES

    graphs = FAMILIES[manifest.family].graphs
    runners: dict[str, OrtRunner] = {}
    checks = []
    for k, size in enumerate(sizes):
        inputs = graphs.inputs(model, size, seed)
        for spec in graphs.specs(model, False):
            size_free = spec.name in graphs.size_free
            if size_free and k > 0:
                continue  # no image input: checked once
            feeds = inputs[spec.name]
            with torch.no_grad():
                expected = spec.module.eval()(*(feeds[name] for name in spec.inputs))
            expected = expected if isinstance(expected, tuple) else (expected,)
            entry = manifest.graph(spec.name, None if size_free else size)
            if entry.file not in runners:
                runners[entry.file] = OrtRunner(directory / entry.file, ["CPUExecutionProvider"])
            actual = runners[entry.file].run({name: v.numpy() for name, v in feeds.items()})
            refs = {name: ref.numpy() for name, ref in zip(spec.outputs, expected, strict=True)}
            tag = "" if size_free else f"@{size[0]}x{size[1]}"
            if spec.name == "openseed_decoder":
                checks += compare_openseed_decoder(model, feeds, refs, actual, tag)
                continue
            checks += [output_check(f"{spec.name}:{name}{tag}", refs[name], actual[name]) for name in refs]
    return checks


def compare_openseed_decoder(
    model: torch.nn.Module,
    feeds: dict[str, torch.Tensor],
    refs: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    tag: str,
) -> list[Check]:
    """The top-k selection (same set up to near-ties), then the per-query outputs matched by proposal."""
    from export.families import OPENSEED_LEVELS

    record: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        levels = [feeds[name] for name in OPENSEED_LEVELS]
        model.decoder(levels, feeds["mask_features"], feeds["class_embeddings"], False, record)
    scores = record["decoder.enc_class_logits"].max(dim=-1)[0].numpy()  # (B, S) per proposal
    tie = ATOL + RTOL * float(np.abs(scores[np.isfinite(scores)]).max())
    ref_idx, got_idx = refs["topk_indices"], actual["topk_indices"]
    swapped, far, reordered = 0, 0, 0
    pairs: list[tuple[int, list[int], list[int]]] = []  # per image: matched torch / onnx query rows
    for b in range(ref_idx.shape[0]):
        where = {int(p): i for i, p in enumerate(got_idx[b])}
        rows = [(i, where[int(p)]) for i, p in enumerate(ref_idx[b]) if int(p) in where]
        kth = scores[b, ref_idx[b]].min()
        extra = set(map(int, got_idx[b])) - set(map(int, ref_idx[b]))
        swapped += len(extra)
        far += sum(abs(scores[b, p] - kth) > tie for p in extra)
        reordered += sum(i != j for i, j in rows)
        pairs.append((b, [i for i, _ in rows], [j for _, j in rows]))
    note = "same selection and order"
    if swapped or reordered:
        note = f"{swapped} swapped ({far} not near-ties), {reordered} reordered"
    # max_abs: proposals selected by ONNX Runtime only; scale: the tie tolerance of the scores.
    checks = [Check(f"openseed_decoder:topk_indices{tag}", float(swapped), tie, far == 0, note)]
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        ref = np.concatenate([refs[name][b, rows_t] for b, rows_t, _ in pairs])
        got = np.concatenate([actual[name][b, rows_o] for b, _, rows_o in pairs])
        checks.append(output_check(f"openseed_decoder:{name}{tag}", ref, got))
    return checks


def compare_reference_case(exported: ExportedModel, case_dir: Path) -> list[Check]:
    """Captioning and retrieval of a golden case through the exported model, under the case's rules."""
    case = json.loads((case_dir / "case.json").read_text())
    checks = []

    def add(task: str, name: str, actual: torch.Tensor | np.ndarray) -> None:
        npz = np.load(case_dir / case["tasks"][task]["file"])
        ok, max_abs, max_rel = compare_array(name, actual, npz, case["tasks"][task])
        scale = max_abs / max_rel if max_rel else 0.0
        checks.append(Check(f"{task}:{name}", float(max_abs), float(scale), bool(ok)))

    spec = case["tasks"]["captioning"]
    images = torch.from_numpy(np.load(case_dir / spec["file"])["input_tensor"])
    features = exported.encode_images(images)
    tokens = exported.greedy_caption(features, spec.get("steps", 50), early_stop=False)
    add("captioning", "captioning.final_tokens", tokens[0])

    spec = case["tasks"]["retrieval"]
    npz = np.load(case_dir / spec["file"])
    features = exported.encode_images(torch.from_numpy(npz["input_tensor"]))
    head, _ = exported.decoder.forward_seg(features.memory)
    decoder = head.embeds[:, -1]
    backbone = exported.backbone_embedding(features)
    text = exported.text_encoder.eos_features(torch.from_numpy(npz["retrieval.text_input_ids"]))
    add("retrieval", "final.pred_captions", head.embeds)
    add("retrieval", "retrieval.image_embed_decoder", decoder)
    add("retrieval", "retrieval.image_embed_backbone", backbone)
    add("retrieval", "retrieval.text_embeds", text)
    add("retrieval", "retrieval.scores", retrieval_scores(decoder, backbone, text))
    return checks


def verify_export(
    directory: str | Path,
    checkpoint: str | Path | None = None,
    sizes: list[tuple[int, int]] | None = None,
    seed: int = 1,
    reference: str | Path | None = None,
) -> list[Check]:
    """All checks of the export in `directory` (see the module docstring)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if checkpoint is None:
        checkpoint = manifest.extra.get("checkpoint")
    family = manifest.family != "xdecoder"
    if family:
        from export.families import model_from_manifest

        if reference is not None:
            raise ValueError(f"--reference takes an X-Decoder golden case, not a {manifest.family} one")
        model, weights_id = model_from_manifest(manifest, checkpoint)
    else:
        model, weights_id = build_model(manifest.model, checkpoint)
    if weights_id != manifest.weights_id:
        raise ValueError(
            f"the export was made from weights {manifest.weights_id}, but {checkpoint} is {weights_id}; "
            "pass the export's checkpoint with --checkpoint"
        )
    if family:
        sizes = sizes or [(h, w) for h, w in manifest.input_sizes]
        return compare_family_graphs(directory, manifest, model, sizes, seed)
    exported = load_exported(directory, "onnxruntime")
    if sizes is None:
        base = max(rule.nominal_size() for rule in model.cfg.resize.values())
        sizes = check_sizes(manifest.input_sizes, manifest.dynamic, padded_size(*base))
    checks = compare_graphs(exported, model, sizes, seed)
    if reference is not None:
        checks += compare_reference_case(exported, Path(reference))
    return checks
