"""The assembled X-Decoder model, with the official top-level key layout:

    backbone.*                          FocalNet (models.backbones.focalnet)
    backbone_proj                       (C5, D): res5 pooled -> joint space, for retrieval
    sem_seg_head.pixel_decoder.*        transformer-encoder FPN (models.pixel_decoders.fpn_encoder)
    sem_seg_head.predictor.*            X-Decoder decoder (models.decoders.xdecoder)
    sem_seg_head.predictor.lang_encoder.*   text encoder (models.language.text_encoder)

This module only wires the parts together; task logic (postprocessing, greedy captioning, scoring)
lives in `models.predictor` and `models.postprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.backbones.focalnet import FocalNet
from models.configs import XDecoderConfig
from models.decoders.xdecoder import DecoderMemory, XDecoder
from models.language.text_encoder import LanguageEncoder, TextEncoderConfig
from models.pixel_decoders.fpn_encoder import TransformerEncoderPixelDecoder


class SemSegHead(nn.Module):
    def __init__(self, cfg: XDecoderConfig, in_channels: list[int]) -> None:
        super().__init__()
        self.pixel_decoder = TransformerEncoderPixelDecoder(cfg.pixel_decoder, in_channels)
        self.predictor = XDecoder(cfg.decoder, cfg.text.projection_dim)
        text = TextEncoderConfig(
            width=cfg.text.width,
            layers=cfg.text.layers,
            heads=cfg.text.heads,
            context_length=cfg.text.context_length,
            vocab_size=cfg.text.vocab_size,
            projection_dim=cfg.text.projection_dim,
        )
        self.predictor.lang_encoder = LanguageEncoder(text)


@dataclass
class ImageFeatures:
    """Everything computed once per image batch: backbone outputs and the decoder memory."""

    backbone: dict[str, torch.Tensor]
    encoder_features: torch.Tensor
    multi_scale: list[torch.Tensor]
    memory: DecoderMemory


class XDecoderModel(nn.Module):
    """Backbone + pixel decoder + decoder + text encoder. `state_dict()` keys equal the official ones
    (plus the rebuildable `sem_seg_head.predictor.self_attn_mask` buffer)."""

    def __init__(self, cfg: XDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = FocalNet(cfg.backbone)
        c5 = self.backbone.out_channels[-1]
        self.backbone_proj = nn.Parameter(torch.zeros(c5, cfg.text.projection_dim))
        self.sem_seg_head = SemSegHead(cfg, self.backbone.out_channels)

    @property
    def decoder(self) -> XDecoder:
        return self.sem_seg_head.predictor

    @property
    def text_encoder(self) -> LanguageEncoder:
        return self.sem_seg_head.predictor.lang_encoder

    def encode_images(
        self, images: torch.Tensor, sizes: list[tuple[int, int]] | None = None
    ) -> ImageFeatures:
        """images (B, 3, H, W) normalised and zero-padded (H, W multiples of 32); sizes: per image its
        own padded size (h, w), each a multiple of 32, or None when every image fills the batch."""
        b, _, h, w = images.shape
        if sizes is not None and all(s == (h, w) for s in sizes):
            sizes = None
        valid = None
        if sizes is not None:
            valid = torch.zeros(b, 1, h, w, device=images.device, dtype=images.dtype)
            for i, (sh, sw) in enumerate(sizes):
                valid[i, :, :sh, :sw] = 1
        feats = self.backbone(images, valid)
        valid4 = None if valid is None else valid[:, :, ::4, ::4]
        mask_features, encoded, multi_scale = self.sem_seg_head.pixel_decoder(feats, valid4)
        regions = None if sizes is None else [(sh // 4, sw // 4) for sh, sw in sizes]
        memory = self.decoder.prepare_memory(multi_scale, mask_features, regions)
        return ImageFeatures(feats, encoded, multi_scale, memory)

    def backbone_embedding(self, features: ImageFeatures) -> torch.Tensor:
        """Global average pool of res5 over each image's own area, @ backbone_proj: (B, D)."""
        res5 = features.backbone["res5"]
        regions = features.memory.regions
        if regions is None:
            pooled = res5.mean(dim=(2, 3))
        else:
            pooled = torch.stack(
                [res5[i, :, : rh // 8, : rw // 8].mean(dim=(1, 2)) for i, (rh, rw) in enumerate(regions)]
            )
        return pooled @ self.backbone_proj
