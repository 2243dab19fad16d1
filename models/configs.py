"""Named model configurations: one per released X-Decoder checkpoint, plus the small `demo` model.

Plain dataclasses, no yaml. `get_config(name)` returns a fresh copy that callers may modify.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TypeVar

from models.language.text_encoder import TextEncoderConfig

ConfigT = TypeVar("ConfigT")


@dataclass
class FocalNetConfig:
    """FocalNet backbone. `variant` is "focal_dw" (Focal-T: dw1/dw2 convs, post-LN on the sum) or
    "focal" (Focal-L: no depthwise convs, post-LN on the branch, stem padding 2)."""

    variant: str = "focal_dw"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    focal_levels: int = 3
    focal_window: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 4
    # Side (in patches) of the learned absolute position table (`models.backbones.focalnet`);
    # 0: none, as in every released FocalNet.
    position_table: int = 0

    @property
    def out_channels(self) -> list[int]:
        """Channels of res2..res5: embed_dim * 2**i."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]


@dataclass
class PixelDecoderConfig:
    """The pixel decoder. `name` picks the kind: "transformer_encoder_fpn" (X-Decoder: FPN + transformer
    encoder on res5) or "transformer_encoder_deform" (multi-scale deformable attention encoder on
    res3..res5, `num_points` sampling points per head and level).

    The deformable kind only: `num_levels` encoder levels (Mask2Former 3, OpenSeeD 4);
    `level_order` "coarse_first" (Mask2Former: [1/32, 1/16, 1/8]) or "fine_first" (OpenSeeD:
    [1/8, 1/16, 1/32], then extra stride-2 levels made from res5: 1/64, ...); `dim_feedforward` of the
    encoder layers (OpenSeeD 2048, Mask2Former 1024); `fpn_upsample` of the 1/8 level merged into res2:
    "bilinear" (the official models) or "nearest" (the demo model's padding-aware merge)."""

    name: str = "transformer_encoder_fpn"
    conv_dim: int = 512
    mask_dim: int = 512
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_encoder_layers: int = 6
    norm_groups: int = 32
    num_points: int = 4
    num_levels: int = 3
    level_order: str = "coarse_first"
    fpn_upsample: str = "nearest"


# The pixel-decoder sizes of the small models: the embedded demo model and the seeded miniatures of
# the other families (`dataclasses.replace(<family pixel decoder>, **MINIATURE_PIXEL_DECODER)`).
MINIATURE_PIXEL_DECODER = {
    "conv_dim": 64,
    "mask_dim": 64,
    "num_heads": 4,
    "dim_feedforward": 128,
    "num_encoder_layers": 2,
    "norm_groups": 8,
}


@dataclass
class DecoderConfig:
    """The X-Decoder transformer decoder. `num_queries` counts the object queries plus the class query
    (the last one); `num_layers` is the number of decoder layers (the official DEC_LAYERS minus 1)."""

    hidden_dim: int = 512
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 9
    num_queries: int = 101
    context_length: int = 77
    num_feature_levels: int = 3


@dataclass(frozen=True)
class ResizeRule:
    """How a task resizes its input, one of three kinds:

    - `short`/`max_size`: detectron2 ResizeShortestEdge (the released models);
    - `fixed`: exact (h, w), aspect not kept;
    - `scale`/`max_size`: both sides times `scale`, so that a thing keeps its size in pixels whatever
      the size of the image (the demo model's size words depend on it); larger images are scaled
      down further until the long side is at most `max_size`.
    """

    short: int | None = None
    max_size: int | None = None
    fixed: tuple[int, int] | None = None
    scale: float | None = None

    def nominal_size(self) -> tuple[int, int]:
        """A representative (h, w) of the rule's outputs (fixed exports and benchmarks use it): the
        fixed size, short x short, or max_size x max_size for a scale rule."""
        if self.fixed is not None:
            return self.fixed
        if self.scale is not None:
            assert self.max_size is not None
            return self.max_size, self.max_size
        assert self.short is not None
        return self.short, self.short


def official_resize() -> dict[str, ResizeRule]:
    """The resize of each task's official evaluation data path (spec 2.1)."""
    return {
        "segmentation": ResizeRule(short=800, max_size=1333),
        "grounding": ResizeRule(short=512, max_size=1024),
        "captioning": ResizeRule(fixed=(224, 224)),
        "retrieval": ResizeRule(fixed=(224, 224)),
    }


@dataclass
class XDecoderConfig:
    """A complete X-Decoder model: backbone, pixel decoder, decoder and text encoder."""

    name: str
    backbone: FocalNetConfig = field(default_factory=FocalNetConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    resize: dict[str, ResizeRule] = field(default_factory=official_resize)
    # Set for released configs: where the keys manifest of the official model lives in the reference data.
    reference_keys: str | None = None
    released: bool = True


_CONFIGS: dict[str, XDecoderConfig] = {
    "xdecoder-focalt": XDecoderConfig(
        name="xdecoder-focalt",
        backbone=FocalNetConfig(variant="focal_dw", embed_dim=96, depths=(2, 2, 6, 2), focal_levels=3),
        reference_keys="xdecoder_focalt/keys.json",
    ),
    "xdecoder-focall": XDecoderConfig(
        name="xdecoder-focall",
        backbone=FocalNetConfig(variant="focal", embed_dim=192, depths=(2, 2, 18, 2), focal_levels=4),
        decoder=DecoderConfig(num_queries=201),
        reference_keys="xdecoder_focall/keys.json",
    ),
    # The embedded demo model (models/demo/README.md): trained on ShapesWorld by `openset train-demo`,
    # weights in models/weights/demo.safetensors (fp16). Same modules as the released models, scaled
    # down, with the multi-scale deformable attention pixel decoder and the real CLIP vocabulary.
    # Every task scales its input by 0.4 (long side at most 180): ShapesWorld images of 192 to 448
    # pixels become 77 to 179, and a radius keeps its size in pixels, as the size words need.
    "demo": XDecoderConfig(
        name="demo",
        backbone=FocalNetConfig(
            variant="focal_dw", embed_dim=24, depths=(1, 1, 2, 1), focal_levels=2, position_table=64
        ),
        pixel_decoder=PixelDecoderConfig(
            name="transformer_encoder_deform", num_points=4, **MINIATURE_PIXEL_DECODER
        ),
        decoder=DecoderConfig(hidden_dim=64, num_heads=4, dim_feedforward=256, num_layers=6, num_queries=17),
        text=TextEncoderConfig(width=64, layers=2, heads=4, projection_dim=64),
        resize={task: ResizeRule(scale=0.4, max_size=180) for task in official_resize()},
        released=False,
    ),
}


def config_names() -> list[str]:
    return list(_CONFIGS)


def named_config(configs: dict[str, ConfigT], name: str, family: str) -> ConfigT:
    """A copy of `configs[name]` (callers may modify it); an unknown name raises a `KeyError` listing
    the known ones. The lookup of every family's registry."""
    if name not in configs:
        raise KeyError(f"unknown {family} config {name!r}; known configs: {', '.join(configs)}")
    return copy.deepcopy(configs[name])


def get_config(name: str) -> XDecoderConfig:
    """A copy of the named X-Decoder config (see `named_config`)."""
    return named_config(_CONFIGS, name, "X-Decoder")
