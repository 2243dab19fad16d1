"""Export a model's graphs to ONNX files plus the manifest (`openset export onnx`).

    export_onnx_model("demo", None, Path("exports/demo"), msda="plugin", dynamic=True)

Graphs are traced with the TorchScript exporter (`models.ops.onnx_export.export_onnx`, which writes
multi-scale deformable attention in the chosen form) on seeded example inputs of batch 2, so no
axis is specialised to 1. `export_model` serves every model family through a `GraphSet` (its graphs,
example inputs and default sizes): `XDECODER_GRAPHS` here, OpenSeeD and Mask2Former in
`export.families`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.graphs import FEATURES, GraphSpec, graph_specs
from export.manifest import MSDA_FORMS, GraphEntry, Manifest
from export.symbolics import MIN_OPSET, register_symbolics
from export.traceable import traceable
from models.checkpoint import file_sha256
from models.language.tokenizer import BOS_ID, EOS_ID
from models.ops import MSDeformAttn
from models.ops.onnx_export import export_onnx
from models.predictor import build_model
from models.preprocess import padded_size
from models.xdecoder import XDecoderModel

logger = logging.getLogger(__name__)

EXAMPLE_BATCH = 2
EXAMPLE_TOKENS = 5
# Caption positions of the traced `caption_step`: more than one, since `XDecoder.caption_rows` leaves
# out the causal mask for a single position (nothing is blocked there) and tracing keeps one branch.
EXAMPLE_LENGTH = 4


def default_sizes(model: XDecoderModel) -> list[tuple[int, int]]:
    """Fixed sizes of a non-dynamic export: each task's nominal size (`ResizeRule.nominal_size`), padded."""
    sizes = []
    for rule in model.cfg.resize.values():
        size = padded_size(*rule.nominal_size())
        if size not in sizes:
            sizes.append(size)
    return sizes


def has_deformable_attention(model: XDecoderModel) -> bool:
    return any(isinstance(m, MSDeformAttn) for m in model.modules())


def example_inputs(
    model: XDecoderModel, size: tuple[int, int], seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded inputs of every graph at image size `size`, the decoder inputs made by the torch model."""
    from export.graphs import CaptionState, ImageEncoder, TextEncoder

    gen = torch.Generator().manual_seed(seed)
    b = EXAMPLE_BATCH
    images = torch.randn(b, 3, *size, generator=gen)
    dim = model.cfg.text.projection_dim
    with torch.no_grad():
        encoded = ImageEncoder(model)(images)
        features = dict(zip(FEATURES, encoded[:4], strict=True))
        state = CaptionState(model)(*encoded[:4])
        ids = text_ids(model, b, EXAMPLE_LENGTH, gen)
        token_features = TextEncoder(model)(ids)[0]
    classes = torch.nn.functional.normalize(torch.randn(7, dim, generator=gen), dim=-1)
    tokens = torch.randn(b, EXAMPLE_TOKENS, dim, generator=gen)
    valid = torch.ones(b, EXAMPLE_TOKENS, dtype=torch.bool)
    valid[1, 3:] = False
    from export.graphs import state_names

    state_inputs = dict(zip(state_names(model.cfg.decoder.num_layers), state, strict=True))
    return {
        "image_encoder": {"images": images},
        "segment_decoder": {**features, "class_embeddings": classes},
        "grounding_decoder": {**features, "tokens": tokens, "token_valid": valid},
        "caption_state": features,
        "caption_step": {"token_features": token_features, **state_inputs},
        "text_encoder": {"input_ids": text_ids(model, 3, 9, gen)},
    }


def text_ids(model: XDecoderModel, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n, length) ids: BOS, random tokens, an EOS at a random position (>= 1), random after it."""
    vocab = model.cfg.text.vocab_size
    ids = torch.randint(1, min(vocab, EOS_ID) - 2, (n, length), generator=gen)
    ids[:, 0] = BOS_ID
    ends = torch.randint(1, length, (n,), generator=gen)
    ids[torch.arange(n), ends] = EOS_ID
    return ids


def export_graph(
    spec: GraphSpec, inputs: dict[str, torch.Tensor], path: Path, msda_form: str, opset: int
) -> None:
    args = tuple(inputs[name] for name in spec.inputs)
    axes = {k: v for k, v in spec.dynamic_axes.items() if k in spec.inputs or k in spec.outputs}
    with traceable(spec.module):
        export_onnx(
            spec.module.eval(),
            args,
            path,
            msda_form=msda_form,
            opset_version=opset,
            input_names=spec.inputs,
            output_names=spec.outputs,
            dynamic_axes=axes,
        )


@dataclass(frozen=True)
class GraphSet:
    """What `export_model` exports of one model family.

    `specs(model, dynamic_size)` lists the graphs, `inputs(model, size, seed)` gives each graph's
    seeded example inputs at image size (H, W), `sizes(model)` the fixed sizes of an export without
    `--size`; `size_free` names the graphs without an image input (exported once); `dynamic_size`
    tells whether the family's image graphs can take dynamic image axes.
    """

    family: str
    specs: Callable[[nn.Module, bool], list[GraphSpec]]
    inputs: Callable[[nn.Module, tuple[int, int], int], dict[str, dict[str, torch.Tensor]]]
    sizes: Callable[[nn.Module], list[tuple[int, int]]]
    size_free: frozenset[str] = frozenset({"text_encoder"})
    dynamic_size: bool = True


XDECODER_GRAPHS = GraphSet("xdecoder", graph_specs, example_inputs, default_sizes)


def export_onnx_model(
    name: str,
    checkpoint: str | Path | None,
    out: Path,
    msda: str = "plugin",
    dynamic: bool = True,
    opset: int = MIN_OPSET,
    sizes: list[tuple[int, int]] | None = None,
) -> Manifest:
    """Write every graph of the named model (with its checkpoint) and `manifest.json` into `out`.
    OpenSeeD and Mask2Former names go to `export.families.export_family_model`."""
    from export.families import export_family_model, family_of

    if family_of(name) != XDECODER_GRAPHS.family:
        return export_family_model(name, checkpoint, out, msda, dynamic, opset, sizes)
    model, weights_id = build_model(name, checkpoint)
    extra = {"checkpoint": None if checkpoint is None else str(checkpoint)}
    return export_model(model, weights_id, out, msda, dynamic, opset, sizes, extra)


def export_model(
    model: nn.Module,
    weights_id: str,
    out: Path,
    msda: str = "plugin",
    dynamic: bool = True,
    opset: int = MIN_OPSET,
    sizes: list[tuple[int, int]] | None = None,
    extra: dict | None = None,
    graphs: GraphSet = XDECODER_GRAPHS,
) -> Manifest:
    """Export `model` (config `model.cfg`) into `out`; returns the manifest written there.

    `dynamic`: image axes dynamic (one graph each); otherwise one image-side graph per size in
    `sizes` (default `graphs.sizes`). Batch and text axes are always dynamic. `graphs`: the family's
    graph set (X-Decoder by default).
    """
    if msda not in MSDA_FORMS:
        raise ValueError(f"--msda must be one of {sorted(MSDA_FORMS)}, got {msda!r}")
    if msda == "portable" and dynamic and has_deformable_attention(model):
        raise ValueError(
            "the portable MSDA form (GridSample) bakes the level sizes into the graph: export it with "
            "fixed sizes (no --dynamic, sizes from --size), or use --msda plugin for dynamic sizes"
        )
    if dynamic and not graphs.dynamic_size:
        raise ValueError(
            f"{graphs.family} graphs are exported at fixed image sizes: leave out --dynamic and give "
            "the sizes with --size HxW"
        )
    register_symbolics(opset)
    out.mkdir(parents=True, exist_ok=True)
    if dynamic:
        trace_sizes: list[tuple[tuple[int, int], tuple[int, int] | None]] = [(min(graphs.sizes(model)), None)]
        declared: list[tuple[int, int]] = []
    else:
        declared = sizes or graphs.sizes(model)
        trace_sizes = [(s, s) for s in declared]
    entries: list[GraphEntry] = []
    for trace_size, fixed in trace_sizes:
        inputs = graphs.inputs(model, trace_size, 0)
        for spec in graphs.specs(model, dynamic):
            if spec.name in graphs.size_free and any(e.name == spec.name for e in entries):
                continue
            size = None if (fixed is None or spec.name in graphs.size_free) else list(fixed)
            file = spec.name + ("" if size is None else f"_{size[0]}x{size[1]}") + ".onnx"
            logger.info("exporting %s", file)
            export_graph(spec, inputs[spec.name], out / file, MSDA_FORMS[msda], opset)
            entries.append(
                GraphEntry(spec.name, file, file_sha256(out / file), spec.inputs, spec.outputs, size)
            )
    manifest = Manifest(
        kind="onnx",
        model=model.cfg.name,
        weights_id=weights_id,
        config=json.loads(json.dumps(dataclasses.asdict(model.cfg))),
        opset=opset,
        msda=msda,
        dynamic=dynamic,
        input_sizes=[list(s) for s in declared],
        logit_scale=logit_scale_of(model),
        graphs=entries,
        extra={**(extra or {}), "torch": torch.__version__},
        family=graphs.family,
    )
    manifest.write(out)
    return manifest


def logit_scale_of(model: nn.Module) -> float:
    """The text encoder's (log) logit scale; 0.0 for a closed-vocabulary model without one."""
    text = getattr(model, "text_encoder", None)
    return 0.0 if text is None else float(text.logit_scale.detach())
