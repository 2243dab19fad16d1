"""The `transformer_encoder_fpn` pixel decoder of X-Decoder (MaskFormer's TransformerEncoderPixelDecoder).

res5 goes through a 1x1 projection and a post-norm transformer encoder with sine positions; an FPN then
runs top-down over res4, res3, res2. Outputs: `mask_features` (B, D, H/4, W/4), the encoder output
(B, D, H/32, W/32) and `multi_scale_features` [1/32, 1/16, 1/8].

Padding: with a `valid` mask (B, 1, H/4, W/4) of each image's own area, the encoder ignores padded
keys, positions are normalised per image, GroupNorm statistics and 3x3 convs only see each image's
area, so batched and single-image features agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import PixelDecoderConfig


def sine_position_embedding(
    shape: tuple[int, int, int], num_feats: int, valid: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """DETR sine positions, normalised to 2*pi over each image's area: (B, 2*num_feats, H, W).

    The first `num_feats` channels encode y, the last x; sin at even, cos at odd channels.
    """
    b, h, w = shape
    not_mask = torch.ones(b, h, w, device=device) if valid is None else valid[:, 0].float()
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, valid: torch.Tensor | None) -> torch.Tensor:
    """GroupNorm whose statistics cover only each image's area (plain GroupNorm when valid is None)."""
    if valid is None:
        return norm(x)
    b, c, h, w = x.shape
    g = norm.num_groups
    xg = x.reshape(b, g, c // g, h, w)
    m = valid[:, None]  # (B, 1, 1, H, W)
    count = m.sum(dim=(2, 3, 4), keepdim=True) * (c // g)
    mean = (xg * m).sum(dim=(2, 3, 4), keepdim=True) / count
    var = (((xg - mean) * m) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count
    xg = (xg - mean) / torch.sqrt(var + norm.eps)
    return xg.reshape(b, c, h, w) * norm.weight[:, None, None] + norm.bias[:, None, None]


class ConvNorm(nn.Conv2d):
    """detectron2-style Conv2d with an attached `norm` (GroupNorm) and optional ReLU."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, groups: int, relu: bool) -> None:
        super().__init__(in_dim, out_dim, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups, out_dim)
        self.relu = relu

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None and self.kernel_size[0] > 1:
            x = x * valid
        x = masked_group_norm(super().forward(x), self.norm, valid)
        return F.relu(x) if self.relu else x


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer: self-attention, residual, norm1, FFN (ReLU), residual, norm2."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """src, pos (HW, B, D); padding (B, HW) bool, True = padded key."""
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, src, key_padding_mask=padding, need_weights=False)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.conv_dim, cfg.num_heads, cfg.dim_feedforward)
            for _ in range(cfg.num_encoder_layers)
        )


class TransformerEncoderOnly(nn.Module):
    """Holds `encoder.layers.*`, as in the official key layout."""

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(cfg)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """x, pos (B, D, H, W) -> (B, D, H, W)."""
        b, d, h, w = x.shape
        src = x.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        padding = None if valid is None else ~valid[:, 0].flatten(1).bool()
        for layer in self.encoder.layers:
            src = layer(src, pos, padding)
        return src.permute(1, 2, 0).reshape(b, d, h, w)


class TransformerEncoderPixelDecoder(nn.Module):
    """`sem_seg_head.pixel_decoder`: adapter_{1,2,3}, layer_{1..4}, input_proj, transformer, mask_features."""

    def __init__(self, cfg: PixelDecoderConfig, in_channels: list[int]) -> None:
        super().__init__()
        d, g = cfg.conv_dim, cfg.norm_groups
        for k, c in enumerate(in_channels[:-1], start=1):
            self.add_module(f"adapter_{k}", ConvNorm(c, d, 1, g, relu=False))
            self.add_module(f"layer_{k}", ConvNorm(d, d, 3, g, relu=True))
        self.num_levels = len(in_channels)
        self.input_proj = nn.Conv2d(in_channels[-1], d, kernel_size=1)
        self.transformer = TransformerEncoderOnly(cfg)
        self.add_module(f"layer_{self.num_levels}", ConvNorm(d, d, 3, g, relu=True))
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=3, padding=1)
        self.conv_dim = d

    def forward(
        self, features: dict[str, torch.Tensor], valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """features res2..res5 (B, C_i, H_i, W_i); valid (B, 1, H/4, W/4) float or None.

        Returns mask_features (B, mask_dim, H/4, W/4), encoder features (B, D, H/32, W/32) and the
        multi-scale features [1/32, 1/16, 1/8], each (B, D, h, w).
        """
        names = [f"res{i + 2}" for i in range(self.num_levels)]
        valids = [None if valid is None else valid[:, :, :: 2**i, :: 2**i] for i in range(self.num_levels)]
        top = self.num_levels - 1
        x = self.input_proj(features[names[top]])
        pos = sine_position_embedding((x.shape[0], *x.shape[-2:]), self.conv_dim // 2, valids[top], x.device)
        encoded = self.transformer(x, pos, valids[top])
        y = getattr(self, f"layer_{top + 1}")(encoded, valids[top])
        multi_scale = [y]
        for level in range(top - 1, -1, -1):
            lateral = getattr(self, f"adapter_{level + 1}")(features[names[level]], valids[level])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = getattr(self, f"layer_{level + 1}")(y, valids[level])
            if len(multi_scale) < 3:
                multi_scale.append(y)
        mask_input = y if valid is None else y * valid
        return self.mask_features(mask_input), encoded, multi_scale
