"""Mask2Former's transformer decoder (`MultiScaleMaskedTransformerDecoder`, `sem_seg_head.predictor`),
with the official parameter names:

    query_feat, query_embed                   Embedding(Q, D): query content and query position
    level_embed                               Embedding(3, D), rows in the level order [1/32, 1/16, 1/8]
    input_proj.{0,1,2}                        Conv1x1 when the pixel decoder width differs from D
                                              (absent otherwise: identity)
    transformer_cross_attention_layers.i      masked cross-attention (`multihead_attn`, `norm`)
    transformer_self_attention_layers.i       self-attention (`self_attn`, `norm`)
    transformer_ffn_layers.i                  FFN (`linear1`, `linear2`, `norm`)
    decoder_norm                              LayerNorm before every prediction head
    class_embed                               Linear(D, K+1): closed-vocabulary classes, last = no object
    mask_embed.layers.{0,1,2}                 MLP applied to the queries, dotted with the mask features

Layer i attends to level i % 3: masked cross-attention first, then self-attention, then the FFN, all
post-norm. Prediction heads run on the learnable queries before the first layer and after every layer;
each one's masks, resized bilinearly to the next level and thresholded at sigmoid 0.5, block the next
cross-attention (a query whose mask blocks every pixel attends everywhere instead).
The layer modules are X-Decoder's (same math, same names).

This follows the official code. `transformers`' Mask2Former computes the same function in float32
(tests/test_mask2former.py holds it to rounding); it differs in names (converted by
`models.checkpoint_formats`) and, under fp16/bf16 only, in precision: the official pixel decoder casts
its inputs to float32 before the deformable encoder, transformers keeps the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.decoders.xdecoder import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from models.pixel_decoders.fpn_encoder import sine_position_embedding

NUM_LEVELS = 3  # Mask2Former always decodes from three pixel-decoder levels


@dataclass
class Mask2FormerDecoderConfig:
    """`num_layers` is the official DEC_LAYERS minus 1 (the first prediction needs no layer);
    `in_channels` the pixel decoder width (an input projection is built when it differs)."""

    num_classes: int = 133
    hidden_dim: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 9
    num_queries: int = 100
    mask_dim: int = 256
    in_channels: int = 256


@dataclass
class HeadOutput:
    """One prediction round: class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4) and the blocked
    pixels of the next cross-attention (B*heads, Q, h*w) bool (True = not attended)."""

    logits: torch.Tensor
    masks: torch.Tensor
    attn_mask: torch.Tensor


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """`sem_seg_head.predictor` of Mask2Former (see the module docstring)."""

    def __init__(self, cfg: Mask2FormerDecoderConfig) -> None:
        super().__init__()
        if cfg.mask_dim != cfg.hidden_dim:
            raise ValueError("mask_embed needs mask_dim == hidden_dim (as in every released config)")
        d = cfg.hidden_dim
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, cfg.dim_feedforward) for _ in range(cfg.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(NUM_LEVELS, d)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(cfg.in_channels, d, kernel_size=1) if cfg.in_channels != d else nn.Identity()
            for _ in range(NUM_LEVELS)
        )
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def heads(self, output: torch.Tensor, mask_features: torch.Tensor, size: tuple[int, int]) -> HeadOutput:
        """Prediction heads on the decoder state output (Q, B, D); the attention mask targets `size`."""
        d = self.decoder_norm(output).transpose(0, 1)  # (B, Q, D)
        logits = self.class_embed(d)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(d), mask_features)
        # Resized in float32 so that the 0.5 threshold does not move under reduced-precision autocast.
        small = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)
        blocked = (small.sigmoid() < 0.5).flatten(2)  # (B, Q, h*w)
        blocked = blocked.repeat_interleave(self.num_heads, dim=0).detach()
        return HeadOutput(logits, masks, blocked)

    def forward(
        self,
        multi_scale: list[torch.Tensor],
        mask_features: torch.Tensor,
        record: list[HeadOutput] | None = None,
    ) -> HeadOutput:
        """multi_scale: 3 levels (B, C, h_l, w_l) in the order [1/32, 1/16, 1/8]; mask_features
        (B, mask_dim, H/4, W/4). Returns the last prediction round (`pred_logits` = .logits,
        `pred_masks` = .masks); `record` collects every round (the first one and one per layer)."""
        if len(multi_scale) != NUM_LEVELS:
            raise ValueError(f"expected {NUM_LEVELS} feature levels, got {len(multi_scale)}")
        src, pos, sizes = [], [], []
        for level, feat in enumerate(multi_scale):
            b, _, h, w = feat.shape
            sizes.append((h, w))
            p = sine_position_embedding((b, h, w), self.cfg.hidden_dim // 2, None, feat.device)
            pos.append(p.to(feat.dtype).flatten(2).permute(2, 0, 1))  # (hw, B, D)
            x = self.input_proj[level](feat).flatten(2) + self.level_embed.weight[level][None, :, None]
            src.append(x.permute(2, 0, 1))
        batch = mask_features.shape[0]
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)  # (Q, B, D)
        qpos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        head = self.heads(output, mask_features, sizes[0])
        if record is not None:
            record.append(head)
        for i in range(self.cfg.num_layers):
            level = i % NUM_LEVELS
            blocked = head.attn_mask
            blocked = blocked & ~blocked.all(dim=-1, keepdim=True)  # fully blocked rows attend everywhere
            output = self.transformer_cross_attention_layers[i](output, src[level], pos[level], qpos, blocked)
            output = self.transformer_self_attention_layers[i](output, qpos, None)
            output = self.transformer_ffn_layers[i](output)
            head = self.heads(output, mask_features, sizes[(i + 1) % NUM_LEVELS])
            if record is not None:
                record.append(head)
        return head
