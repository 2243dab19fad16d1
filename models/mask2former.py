"""Mask2Former (closed vocabulary) with the detectron2 key layout of the released checkpoints:

    backbone.*                      Swin (models.backbones.swin)
    sem_seg_head.pixel_decoder.*    multi-scale deformable attention pixel decoder
                                    (models.pixel_decoders.ms_deform; bilinear FPN merge)
    sem_seg_head.predictor.*        masked-attention decoder (models.decoders.mask2former)

The classes are those of the training label set (models.labels); a request vocabulary selects among
them (`select_vocabulary`, then `models.labels.select_class_logits` on the logits). Inputs are
normalised with the ImageNet RGB mean/std in 0..255 units (PIXEL_MEAN, PIXEL_STD) and zero-padded to
a multiple of 32, as the official preprocessing does; `Mask2FormerConfig.resize` is the test resize.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from models.backbones.swin import SwinConfig, SwinTransformer
from models.configs import MINIATURE_PIXEL_DECODER, PixelDecoderConfig, ResizeRule, named_config
from models.decoders.mask2former import (
    HeadOutput,
    Mask2FormerDecoderConfig,
    MultiScaleMaskedTransformerDecoder,
)
from models.labels import LabelSet, get_label_set
from models.pixel_decoders.ms_deform import MSDeformAttnPixelDecoder

PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


def mask2former_pixel_decoder() -> PixelDecoderConfig:
    """`MSDeformAttnPixelDecoder` as configured by every released Mask2Former model (spec 5)."""
    return PixelDecoderConfig(
        name="transformer_encoder_deform",
        conv_dim=256,
        mask_dim=256,
        num_heads=8,
        dim_feedforward=1024,
        num_encoder_layers=6,
        norm_groups=32,
        num_points=4,
        num_levels=3,
        level_order="coarse_first",
        fpn_upsample="bilinear",
    )


@dataclass
class Mask2FormerConfig:
    """A complete Mask2Former model. `label_set` names the closed label set (`models.labels`); the
    decoder predicts `len(label set) + 1` logits per query (the last one: no object)."""

    name: str
    label_set: str = "coco-panoptic"
    task: str = "panoptic"
    backbone: SwinConfig = field(default_factory=SwinConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=mask2former_pixel_decoder)
    decoder: Mask2FormerDecoderConfig = field(default_factory=Mask2FormerDecoderConfig)
    resize: ResizeRule = field(default_factory=lambda: ResizeRule(short=800, max_size=1333))
    # The official config file (under the Mask2Former repository's configs/), for reference.
    official_config: str | None = None
    # False only for the untrained miniature, which runs with seeded weights and no checkpoint.
    released: bool = True

    @property
    def labels(self) -> LabelSet:
        return get_label_set(self.label_set)


SWIN_T = SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
SWIN_S = SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)
SWIN_B_384 = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)
SWIN_L_384 = SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12)
ADE_RESIZE = ResizeRule(short=512, max_size=2048)
ADE_RESIZE_640 = ResizeRule(short=640, max_size=2560)  # the "res640" configs


def _coco(name: str, backbone: SwinConfig, official: str, queries: int = 100) -> Mask2FormerConfig:
    return Mask2FormerConfig(
        name=name,
        backbone=copy.deepcopy(backbone),
        decoder=Mask2FormerDecoderConfig(num_classes=133, num_queries=queries),
        official_config=f"coco/panoptic-segmentation/swin/{official}.yaml",
    )


def _ade(name: str, backbone: SwinConfig, official: str) -> Mask2FormerConfig:
    return Mask2FormerConfig(
        name=name,
        label_set="ade20k-150",
        task="semantic",
        backbone=copy.deepcopy(backbone),
        decoder=Mask2FormerDecoderConfig(num_classes=150),
        resize=copy.deepcopy(ADE_RESIZE_640 if official.endswith("res640") else ADE_RESIZE),
        official_config=f"ade20k/semantic-segmentation/swin/{official}.yaml",
    )


# The Swin rows of the Mask2Former model zoo (COCO panoptic, ADE20K semantic); every number is a fact
# of the released yaml files: Swin sizes, window 12 for the 384-pretrained backbones, 200 queries
# for Swin-L on COCO panoptic, the ADE20K test resize (512/2048, 640/2560 for "res640").
_CONFIGS: dict[str, Mask2FormerConfig] = {
    c.name: c
    for c in (
        _coco("mask2former-swint-coco-panoptic", SWIN_T, "maskformer2_swin_tiny_bs16_50ep"),
        _coco("mask2former-swins-coco-panoptic", SWIN_S, "maskformer2_swin_small_bs16_50ep"),
        _coco("mask2former-swinb-coco-panoptic", SWIN_B_384, "maskformer2_swin_base_384_bs16_50ep"),
        _coco(
            "mask2former-swinb-in21k-coco-panoptic", SWIN_B_384, "maskformer2_swin_base_IN21k_384_bs16_50ep"
        ),
        _coco(
            "mask2former-swinl-coco-panoptic",
            SWIN_L_384,
            "maskformer2_swin_large_IN21k_384_bs16_100ep",
            queries=200,
        ),
        _ade("mask2former-swint-ade20k-semantic", SWIN_T, "maskformer2_swin_tiny_bs16_160k"),
        _ade("mask2former-swins-ade20k-semantic", SWIN_S, "maskformer2_swin_small_bs16_160k"),
        _ade("mask2former-swinb-ade20k-semantic", SWIN_B_384, "maskformer2_swin_base_384_bs16_160k_res640"),
        _ade(
            "mask2former-swinb-in21k-ade20k-semantic",
            SWIN_B_384,
            "maskformer2_swin_base_IN21k_384_bs16_160k_res640",
        ),
        _ade(
            "mask2former-swinl-ade20k-semantic",
            SWIN_L_384,
            "maskformer2_swin_large_IN21k_384_bs16_160k_res640",
        ),
        # An untrained miniature with the same modules and the COCO panoptic label set (seeded
        # weights, no checkpoint needed): for tests and smoke runs of the serving path.
        Mask2FormerConfig(
            name="mask2former-tiny-coco-panoptic",
            backbone=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7),
            pixel_decoder=dataclasses.replace(mask2former_pixel_decoder(), **MINIATURE_PIXEL_DECODER),
            decoder=Mask2FormerDecoderConfig(
                num_classes=133,
                hidden_dim=64,
                num_heads=4,
                dim_feedforward=128,
                num_layers=3,
                num_queries=20,
                mask_dim=64,
                in_channels=64,
            ),
            resize=ResizeRule(short=256, max_size=384),
            released=False,
        ),
    )
}


def mask2former_config_names() -> list[str]:
    return list(_CONFIGS)


def get_mask2former_config(name: str) -> Mask2FormerConfig:
    """A copy of the named Mask2Former config (see `models.configs.named_config`)."""
    return named_config(_CONFIGS, name, "Mask2Former")


class SemSegHead(nn.Module):
    """`sem_seg_head`: the pixel decoder and the transformer decoder (`predictor`)."""

    def __init__(self, cfg: Mask2FormerConfig, in_channels: list[int]) -> None:
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, in_channels)
        self.predictor = MultiScaleMaskedTransformerDecoder(cfg.decoder)


class Mask2FormerModel(nn.Module):
    """Backbone + pixel decoder + masked-attention decoder; `state_dict()` keys equal the official ones."""

    def __init__(self, cfg: Mask2FormerConfig) -> None:
        super().__init__()
        k = len(cfg.labels)
        if cfg.decoder.num_classes != k:
            raise ValueError(f"{cfg.name}: {cfg.decoder.num_classes} classes, label set has {k}")
        if cfg.decoder.in_channels != cfg.pixel_decoder.conv_dim:
            raise ValueError(f"{cfg.name}: decoder in_channels must equal the pixel decoder conv_dim")
        self.cfg = cfg
        self.backbone = SwinTransformer(cfg.backbone)
        self.sem_seg_head = SemSegHead(cfg, self.backbone.out_channels)

    @property
    def labels(self) -> LabelSet:
        return self.cfg.labels

    def select_vocabulary(self, vocabulary: list[str]) -> list[int]:
        """Class indices of the requested names; `ValueError` naming the valid labels otherwise."""
        return self.labels.select(vocabulary)

    def forward_heads(self, images: torch.Tensor, record: list[HeadOutput] | None = None) -> HeadOutput:
        """images (B, 3, H, W), normalised and padded to a multiple of 32 -> the last prediction round."""
        features = self.backbone(images)
        mask_features, _, multi_scale = self.sem_seg_head.pixel_decoder(features)
        return self.sem_seg_head.predictor(multi_scale, mask_features, record)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> pred_logits (B, Q, K+1), pred_masks (B, Q, H/4, W/4)."""
        head = self.forward_heads(images)
        return head.logits, head.masks
