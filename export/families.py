"""Exported graphs of the OpenSeeD and Mask2Former families (`openset export onnx --model NAME`).

OpenSeeD (`models.openseed.OpenSeeDModel`), three graphs:

    image_encoder     images (B, 3, H, W)    -> mask_features (B, Dm, H/4, W/4), the encoder levels
                                                level0 (B, D, H/8, W/8), level1 (.., H/16),
                                                level2 (.., H/32), level3 (.., H/64)
    openseed_decoder  mask_features, level0..level3, class_embeddings (C, E)
                                             -> pred_logits (B, Q, C), pred_boxes (B, Q, 4) cxcywh,
                                                pred_masks (B, Q, H/4, W/4), topk_indices (B, Q) int64
    text_encoder      input_ids (N, 18) int64 -> eos_features (N, E)

The two-stage query selection (top-k of the proposals' best class logit, so it depends on the
vocabulary) stays inside `openseed_decoder`; `topk_indices` are the selected memory positions
(decoder memory order [1/64, 1/32, 1/16, 1/8], best first), which `openset export verify` compares
with torch's. C (the vocabulary) is a dynamic axis, as are B and N.

Mask2Former (`models.mask2former.Mask2FormerModel`), one graph:

    mask2former       images (B, 3, H, W)    -> class_logits (B, Q, K+1), mask_logits (B, Q, H/4, W/4)

Both families export at fixed image sizes (`--size HxW`, default the config's short side squared):
the Swin backbone pads each stage to its window with sizes known at trace time. Multi-scale
deformable attention takes either ONNX form (`--msda plugin|portable`), as for X-Decoder; the export
loop, manifest and checksums are `export.onnx_graphs.export_model`'s with the `GraphSet`s below.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.graphs import GraphSpec, TextEncoder
from export.manifest import Manifest
from export.onnx_graphs import GraphSet, export_model, text_ids
from export.symbolics import MIN_OPSET
from models.checkpoint import load_checkpoint, quick_hash
from models.checkpoint_formats import load_any_checkpoint
from models.mask2former import (
    Mask2FormerConfig,
    Mask2FormerModel,
    get_mask2former_config,
    mask2former_config_names,
)
from models.openseed import OpenSeeDConfig, OpenSeeDModel, get_openseed_config, openseed_config_names

EXAMPLE_BATCH = 2
EXAMPLE_CLASSES = 7
EXAMPLE_TEXTS = 3
OPENSEED_LEVELS = ["level0", "level1", "level2", "level3"]  # encoder order [1/8, 1/16, 1/32, 1/64]
OPENSEED_FEATURES = ["mask_features", *OPENSEED_LEVELS]
OPENSEED_OUTPUTS = ["pred_logits", "pred_boxes", "pred_masks", "topk_indices"]


# ---------------------------------------------------------------------------- OpenSeeD graphs


class OpenSeeDImageEncoder(nn.Module):
    """Backbone and pixel decoder: images (B, 3, H, W) -> mask_features and the 4 encoder levels."""

    def __init__(self, model: OpenSeeDModel) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.pixel_decoder = model.sem_seg_head.pixel_decoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask_features, _, levels = self.pixel_decoder(self.backbone(images))
        return (mask_features, *levels)


class OpenSeeDDecoderGraph(nn.Module):
    """The predictor on the image encoder's outputs and a vocabulary, with its top-k selection."""

    def __init__(self, model: OpenSeeDModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """mask_features (B, Dm, H/4, W/4), level0..3 (B, D, h, w), class_embeddings (C, E)."""
        mask_features, *levels, class_embeddings = inputs
        record: dict[str, torch.Tensor] = {}  # only the selection is read; the rest is pruned
        out = self.decoder(levels, mask_features, class_embeddings, masks=True, record=record)
        return out.pred_logits, out.pred_boxes, out.pred_masks, record["decoder.topk_proposals"]


class EosTextEncoder(TextEncoder):
    """First-EOS features (N, E) of ids (N, L), projected (the class-name embedding's input)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids)[1]


def openseed_specs(model: nn.Module, dynamic_size: bool = False) -> list[GraphSpec]:
    """The three OpenSeeD graphs; batch, class and text axes dynamic (image sizes fixed)."""
    del dynamic_size  # fixed image sizes only (see the module docstring)
    assert isinstance(model, OpenSeeDModel)
    batch = {name: {0: "batch"} for name in ["images", *OPENSEED_FEATURES]}
    return [
        GraphSpec("image_encoder", OpenSeeDImageEncoder(model), ["images"], OPENSEED_FEATURES, batch),
        GraphSpec(
            "openseed_decoder",
            OpenSeeDDecoderGraph(model),
            [*OPENSEED_FEATURES, "class_embeddings"],
            OPENSEED_OUTPUTS,
            {
                **batch,
                "class_embeddings": {0: "classes"},
                "pred_logits": {0: "batch", 2: "classes"},
                "pred_boxes": {0: "batch"},
                "pred_masks": {0: "batch"},
                "topk_indices": {0: "batch"},
            },
        ),
        GraphSpec(
            "text_encoder",
            EosTextEncoder(model),  # type: ignore[arg-type]
            ["input_ids"],
            ["eos_features"],
            {"input_ids": {0: "texts"}, "eos_features": {0: "texts"}},
        ),
    ]


def openseed_inputs(
    model: nn.Module, size: tuple[int, int], seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded inputs of the three graphs at image size `size`; decoder inputs made by torch."""
    assert isinstance(model, OpenSeeDModel)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(EXAMPLE_BATCH, 3, *size, generator=gen)
    with torch.no_grad():
        features = dict(zip(OPENSEED_FEATURES, OpenSeeDImageEncoder(model)(images), strict=True))
    dim = model.cfg.text.projection_dim
    classes = nn.functional.normalize(torch.randn(EXAMPLE_CLASSES, dim, generator=gen), dim=-1)
    ids = text_ids(model, EXAMPLE_TEXTS, model.cfg.text.context_length, gen)  # type: ignore[arg-type]
    return {
        "image_encoder": {"images": images},
        "openseed_decoder": {**features, "class_embeddings": classes},
        "text_encoder": {"input_ids": ids},
    }


# ---------------------------------------------------------------------------- Mask2Former graph


def mask2former_specs(model: nn.Module, dynamic_size: bool = False) -> list[GraphSpec]:
    """The one Mask2Former graph (the model itself); batch axis dynamic."""
    del dynamic_size
    assert isinstance(model, Mask2FormerModel)
    axes = {name: {0: "batch"} for name in ("images", "class_logits", "mask_logits")}
    return [GraphSpec("mask2former", model, ["images"], ["class_logits", "mask_logits"], axes)]


def mask2former_inputs(
    model: nn.Module, size: tuple[int, int], seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {"mask2former": {"images": torch.randn(EXAMPLE_BATCH, 3, *size, generator=gen)}}


def square_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """The default fixed size: the resize rule's short side, squared and rounded up to 32."""
    short = model.cfg.resize.short  # type: ignore[union-attr]
    side = -(-int(short) // 32) * 32
    return [(side, side)]


# ---------------------------------------------------------------------------- the families


@dataclass(frozen=True)
class Family:
    """A model family: its graph set, config and model classes, named configs and weights loader."""

    graphs: GraphSet
    config_class: type
    model_class: type[nn.Module]
    config_names: Callable[[], list[str]]
    get_config: Callable[[str], Any]
    load_weights: Callable[[nn.Module, str | Path], None]


FAMILIES: dict[str, Family] = {
    "openseed": Family(
        GraphSet(
            "openseed",
            openseed_specs,
            openseed_inputs,
            square_sizes,
            frozenset({"text_encoder"}),
            dynamic_size=False,
        ),
        OpenSeeDConfig,
        OpenSeeDModel,
        openseed_config_names,
        get_openseed_config,
        load_checkpoint,
    ),
    "mask2former": Family(
        GraphSet(
            "mask2former",
            mask2former_specs,
            mask2former_inputs,
            square_sizes,
            frozenset(),
            dynamic_size=False,
        ),
        Mask2FormerConfig,
        Mask2FormerModel,
        mask2former_config_names,
        get_mask2former_config,
        load_any_checkpoint,
    ),
}


def family_of(name: str) -> str:
    """ "openseed", "mask2former" or (any other name) "xdecoder"."""
    for family, spec in FAMILIES.items():
        if name in spec.config_names():
            return family
    return "xdecoder"


def load_family_model(family: str, cfg: Any, checkpoint: str | Path | None) -> tuple[nn.Module, str]:
    """The model of `cfg` with the checkpoint's weights (strict) and the weights' identity."""
    if checkpoint is None:
        raise ValueError(f"model {cfg.name!r} needs a checkpoint: pass --checkpoint PATH")
    spec = FAMILIES[family]
    model = spec.model_class(cfg)
    spec.load_weights(model, checkpoint)
    return model.eval(), quick_hash(checkpoint)[:12]


def export_family_model(
    name: str,
    checkpoint: str | Path | None,
    out: Path,
    msda: str = "plugin",
    dynamic: bool = False,
    opset: int = MIN_OPSET,
    sizes: list[tuple[int, int]] | None = None,
) -> Manifest:
    """`export_onnx_model` for a named OpenSeeD or Mask2Former config."""
    family = family_of(name)
    spec = FAMILIES[family]
    if dynamic:  # refused before the (slow) model load; `export_model` would refuse it too
        raise ValueError(
            f"{family} graphs are exported at fixed image sizes: leave out --dynamic and give the sizes "
            "with --size HxW"
        )
    model, weights_id = load_family_model(family, spec.get_config(name), checkpoint)
    extra = {"checkpoint": None if checkpoint is None else str(checkpoint)}
    return export_model(model, weights_id, out, msda, dynamic, opset, sizes, extra, graphs=spec.graphs)


def model_from_manifest(manifest: Manifest, checkpoint: str | Path | None) -> tuple[nn.Module, str]:
    """The torch model an export was made from: the manifest's own config and `checkpoint`."""
    spec = FAMILIES[manifest.family]
    cfg = config_from_dict(spec.config_class, manifest.config)
    if json.loads(json.dumps(dataclasses.asdict(cfg))) != manifest.config:
        raise ValueError(f"the manifest's {manifest.family} config does not rebuild exactly; export again")
    return load_family_model(manifest.family, cfg, checkpoint)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A (nested) config dataclass from its JSON form (`dataclasses.asdict`, tuples as lists)."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _field_value(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)})


def _field_value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple(value)
    if origin is dict:
        value_hint = typing.get_args(hint)[1]
        return {k: _field_value(value_hint, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return _field_value(next(a for a in typing.get_args(hint) if a is not type(None)), value)
    return value
