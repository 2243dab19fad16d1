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
from models.language.text_encoder import LanguageEncoder
from models.language.tokenizer import BOS_ID, EOS_ID
from models.pixel_decoders.fpn_encoder import TransformerEncoderPixelDecoder
from models.pixel_decoders.ms_deform import MSDeformAttnPixelDecoder


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) values stored with strides (1, out): its transpose is contiguous."""
    return weight.t().contiguous().t()


class SemSegHead(nn.Module):
    def __init__(self, cfg: XDecoderConfig, in_channels: list[int]) -> None:
        super().__init__()
        if cfg.pixel_decoder.name == "transformer_encoder_deform":
            self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, in_channels)
        elif cfg.pixel_decoder.name == "transformer_encoder_fpn":
            self.pixel_decoder = TransformerEncoderPixelDecoder(cfg.pixel_decoder, in_channels)
        else:
            raise ValueError(f"unknown pixel decoder {cfg.pixel_decoder.name!r}")
        self.predictor = XDecoder(cfg.decoder, cfg.text.projection_dim)
        self.predictor.lang_encoder = LanguageEncoder(cfg.text)


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

    def lay_out_caption_step_weights(self) -> None:
        """Store each matrix a greedy caption step reads contiguous along its longer side, in place
        (CPU serving).

        Same values and shapes; only the strides change. A step runs one row per image through the
        text encoder, the decoder layers and the 49,408-row output embedding, so it is a chain of
        matrix-vector products bound by reading the weights. On a CPU, MKL streams a matrix fastest
        when its long rows are contiguous: an expanding matrix (out > in: the 49,408 x 512 output
        embedding, the first FFN layers, the stacked q/k/v projections) is stored column-major, the
        (out, in) weight with strides (1, out), so `F.linear` becomes a plain row-major product; a
        contracting one (out < in: the second FFN layers) stays row-major. load_tests/RESULTS.md has
        the measurements. Batched products give the same results to float rounding (the reference
        cases run this layout), `load_state_dict` copies keep the strides, and the token-embedding
        lookups read strided rows.
        """
        decoder = self.decoder
        step_modules = [
            self.text_encoder.lang_encoder.resblocks,
            decoder.transformer_cross_attention_layers,
            decoder.transformer_self_attention_layers,
            decoder.transformer_ffn_layers,
        ]
        weights = [p for m in step_modules for p in m.parameters() if p.dim() == 2]
        weights.append(self.text_encoder.lang_encoder.token_embedding.weight)
        for weight in weights:
            expanding = weight.shape[0] > weight.shape[1]  # (out, in)
            weight.data = column_major(weight.data) if expanding else weight.data.contiguous()

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

    def greedy_caption(
        self, features: ImageFeatures, steps: int = 50, early_stop: bool = True, record: dict | None = None
    ) -> torch.Tensor:
        """Greedy captioning as the official decoder does it: ids (B, L) all start tokens; step s sets
        position s+1 to the argmax of the logits at position s. Returns the ids (B, L).

        Caption rows and the text encoder are causal, so step s runs both on position s alone
        (earlier positions' keys and values are cached per layer, in `state.joint_kv` and a
        `TextKVCache`); the query rows are computed once. `early_stop` ends once every row holds an
        end-of-text token (the text is cut there).
        `record` (reference checks) receives per-step inputs and top-10 ids/logits and, at step 0, the
        full-length text features and caption rows before the first / after the last layer.
        """
        decoder, text = self.decoder, self.text_encoder
        batch = features.memory.mask_features.shape[0]
        length = self.cfg.text.context_length
        tokens = torch.full(
            (batch, length), BOS_ID, dtype=torch.long, device=features.memory.mask_features.device
        )
        state = decoder.caption_state(features.memory)
        text_cache = text.new_cache(batch)
        vocab = text.lang_encoder.token_embedding.weight
        steps = min(steps, length - 1)
        for s in range(steps):
            if record is not None:
                record.setdefault("tokens_input_per_step", []).append(tokens.clone())
            if record is not None and s == 0:
                rows_record: list[torch.Tensor] = []
                full = text.token_features(tokens)
                record["step0_text_token_features"] = full
                decoder.caption_rows(state, full, record=rows_record)
                record["step0_first_layer_caption_features"] = rows_record[0]
                record["step0_last_layer_caption_features"] = rows_record[-1]
            # Only position s is new: earlier positions are cached (text and rows are causal).
            new_features = text.token_features_step(tokens[:, s : s + 1], text_cache)
            rows = decoder.caption_rows(state, new_features, start=s, cache=True)
            logits = rows[:, 0] @ vocab.transpose(0, 1)
            tokens[:, s + 1] = logits.argmax(dim=-1)
            if record is not None:
                top = logits.topk(10, dim=-1)
                record.setdefault("step_top10_token_ids", []).append(top.indices)
                record.setdefault("step_top10_logits", []).append(top.values)
            if early_stop and bool((tokens[:, 1 : s + 2] == EOS_ID).any(dim=1).all()):
                break
        return tokens
