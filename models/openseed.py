"""The assembled OpenSeeD model, with the official top-level key layout:

    backbone.*                              Swin (models.backbones.swin)
    sem_seg_head.pixel_decoder.*            4-level deformable encoder + FPN (pixel_decoders.ms_deform)
    sem_seg_head.predictor.*                OpenSeeD decoder (models.decoders.openseed)
    sem_seg_head.predictor.lang_encoder.*   text encoder, context length 18 (language.text_encoder)

`state_dict()` lists the keys of the released `model_state_dict_swint_51.2ap.pt`, the 110 tied
aliases included (the Swin `relative_position_index` tables are rebuilt, `criterion.*` is training
only). Postprocessing lives in `models.postprocess_openseed`.

A caller (the Predictor) runs: `encode_texts(names)` -> `model(images, class_embeddings)` on a
padded batch -> per image `models.postprocess_openseed` on the outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from models.backbones.swin import SwinConfig, SwinTransformer
from models.configs import MINIATURE_PIXEL_DECODER, PixelDecoderConfig, ResizeRule, named_config
from models.decoders.openseed import OpenSeeDDecoder, OpenSeeDDecoderConfig
from models.language.text_encoder import LanguageEncoder, TextEncoderConfig
from models.language.tokenizer import ClipTokenizer
from models.pixel_decoders.ms_deform import MSDeformAttnPixelDecoder
from models.postprocess_openseed import OpenSeeDPostprocessConfig


def openseed_pixel_decoder() -> PixelDecoderConfig:
    """The OpenSeeD encoder: 256 channels, 6 layers, FFN 2048, 4 levels [1/8, 1/16, 1/32, 1/64]."""
    return PixelDecoderConfig(
        name="transformer_encoder_deform",
        conv_dim=256,
        mask_dim=256,
        num_heads=8,
        dim_feedforward=2048,
        num_encoder_layers=6,
        norm_groups=32,
        num_points=4,
        num_levels=4,
        level_order="fine_first",
        fpn_upsample="bilinear",
    )


@dataclass
class OpenSeeDConfig:
    """A complete OpenSeeD model. `resize` is the official COCO evaluation resize (the short side to
    800, at most 1333; OpenSeeD resizes with PIL bicubic)."""

    name: str
    backbone: SwinConfig = field(default_factory=SwinConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=openseed_pixel_decoder)
    decoder: OpenSeeDDecoderConfig = field(default_factory=OpenSeeDDecoderConfig)
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(context_length=18))
    postprocess: OpenSeeDPostprocessConfig = field(default_factory=OpenSeeDPostprocessConfig)
    resize: ResizeRule = field(default_factory=lambda: ResizeRule(short=800, max_size=1333))
    # Where the keys manifest of the official model lives in the reference data.
    reference_keys: str | None = None
    released: bool = True


_CONFIGS: dict[str, OpenSeeDConfig] = {
    # model_state_dict_swint_51.2ap.pt with configs/openseed/openseed_swint_lang.yaml
    "openseed-swint": OpenSeeDConfig(name="openseed-swint", reference_keys="openseed_swint/keys.json"),
    # An untrained miniature with the same modules (seeded weights, no checkpoint needed): for tests
    # and smoke runs of the serving path. Its outputs mean nothing.
    "openseed-tiny": OpenSeeDConfig(
        name="openseed-tiny",
        backbone=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7),
        pixel_decoder=dataclasses.replace(openseed_pixel_decoder(), **MINIATURE_PIXEL_DECODER),
        decoder=OpenSeeDDecoderConfig(
            hidden_dim=64, num_queries=30, num_layers=2, num_heads=4, dim_feedforward=128, mask_dim=64
        ),
        text=TextEncoderConfig(width=64, layers=2, heads=4, context_length=18, projection_dim=64),
        resize=ResizeRule(short=256, max_size=384),
        released=False,
    ),
}


def openseed_config_names() -> list[str]:
    return list(_CONFIGS)


def get_openseed_config(name: str) -> OpenSeeDConfig:
    """A copy of the named OpenSeeD config (see `models.configs.named_config`)."""
    return named_config(_CONFIGS, name, "OpenSeeD")


class OpenSeeDHead(nn.Module):
    """`sem_seg_head`: the pixel decoder and the predictor (which owns the text encoder)."""

    def __init__(self, cfg: OpenSeeDConfig, in_channels: list[int]) -> None:
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, in_channels)
        self.predictor = OpenSeeDDecoder(cfg.decoder, cfg.text)


class OpenSeeDModel(nn.Module):
    """Backbone + pixel decoder + decoder + text encoder (see the module docstring)."""

    def __init__(self, cfg: OpenSeeDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = SwinTransformer(cfg.backbone)
        self.sem_seg_head = OpenSeeDHead(cfg, self.backbone.out_channels)

    @property
    def decoder(self) -> OpenSeeDDecoder:
        return self.sem_seg_head.predictor

    @property
    def text_encoder(self) -> LanguageEncoder:
        return self.sem_seg_head.predictor.lang_encoder

    def encode_texts(self, names: list[str], tokenizer: ClipTokenizer | None = None) -> torch.Tensor:
        """Class names -> (C, 512) unit-norm embeddings: the 81-template average (context length 18)."""
        return self.text_encoder.encode_class_names(names, tokenizer or ClipTokenizer())

    def forward(
        self,
        images: torch.Tensor,
        class_embeddings: torch.Tensor,
        masks: bool = True,
        record: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) normalised and zero-padded (H, W multiples of 32); class_embeddings
        (C, 512) from `encode_texts`.

        Returns "pred_logits" (B, 300, C), "pred_boxes" (B, 300, 4) cxcywh normalised to the padded
        image and, unless `masks=False` (detection), "pred_masks" (B, 300, H/4, W/4) mask logits.
        `record` receives the intermediates under the reference names (backbone.*, pixel_decoder.*,
        decoder.*).
        """
        features = self.backbone(images)
        mask_features, _, multi_scale = self.sem_seg_head.pixel_decoder(features)
        out = self.decoder(multi_scale, mask_features, class_embeddings, masks=masks, record=record)
        if record is not None:
            record.update({f"backbone.{k}": v for k, v in features.items()})
            record["pixel_decoder.mask_features"] = mask_features
            record.update({f"pixel_decoder.multi_scale_{i}": m for i, m in enumerate(multi_scale)})
        result = {"pred_logits": out.pred_logits, "pred_boxes": out.pred_boxes}
        if out.pred_masks is not None:
            result["pred_masks"] = out.pred_masks
        return result
