"""The multi-scale deformable attention pixel decoder (Mask2Former's `MSDeformAttnPixelDecoder`, the
`transformer_encoder_deform` of X-Decoder / SEEM), with the official parameter names:

    input_proj.{0,1,2}            Conv1x1 + GroupNorm on res5, res4, res3 -> conv_dim
    transformer.level_embed       (3, conv_dim), one row per level in the order [1/32, 1/16, 1/8]
    transformer.encoder.layers.*  post-norm layers: MSDeformAttn self-attention (`self_attn`,
                                  through `openset::ms_deform_attn`), norm1, FFN linear1/linear2, norm2
    adapter_1, layer_1            FPN on res2: lateral 1x1 + GN, merged, then 3x3 + GN + ReLU
    mask_features                 Conv1x1 -> mask_dim at 1/4

Outputs match `TransformerEncoderPixelDecoder`: `mask_features` (B, mask_dim, H/4, W/4), the encoded
1/32 level (B, D, H/32, W/32) and `multi_scale_features` [1/32, 1/16, 1/8], each (B, D, h, w).

Padding: with a `valid` mask (B, 1, H/4, W/4) of each image's own area, padded values are zeroed
before sampling (as the kernel's zero padding does outside a map), reference points and offsets are
scaled by each image's valid ratios, GroupNorm statistics and 3x3 convs only see each image's area,
and the FPN merge is a nearest 2x upsample, so batched and single-image features agree. (Mask2Former
merges with a bilinear upsample, which would read padded neighbours at the edge of an image.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import PixelDecoderConfig
from models.ops import MSDeformAttn
from models.pixel_decoders.fpn_encoder import ConvNorm, masked_group_norm, sine_position_embedding

NUM_LEVELS = 3  # res3..res5, as in Mask2Former


class InputProjection(nn.Sequential):
    """`input_proj.i`: Conv1x1 (index 0) + GroupNorm (index 1), statistics over each image's area."""

    def __init__(self, in_dim: int, out_dim: int, groups: int) -> None:
        super().__init__(nn.Conv2d(in_dim, out_dim, kernel_size=1), nn.GroupNorm(groups, out_dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return masked_group_norm(self[0](x), self[1], valid)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention, residual, norm1; FFN (ReLU), residual, norm2."""

    def __init__(self, dim: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """src, pos (B, S, D); reference_points (B, S, L, 2); padding_mask (B, S) bool or None."""
        out = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + out)
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(
                cfg.conv_dim, cfg.dim_feedforward, NUM_LEVELS, cfg.num_heads, cfg.num_points
            )
            for _ in range(cfg.num_encoder_layers)
        )


def valid_ratios(valids: list[torch.Tensor | None], batch: int, device: torch.device) -> torch.Tensor:
    """(B, L, 2): per level the share (w, h) of the map that is each image's own area."""
    rows = []
    for valid in valids:
        if valid is None:
            rows.append(torch.ones(batch, 2, device=device))
            continue
        own_h = valid[:, 0, :, 0].sum(dim=1) / valid.shape[-2]
        own_w = valid[:, 0, 0, :].sum(dim=1) / valid.shape[-1]
        rows.append(torch.stack((own_w, own_h), dim=-1))
    return torch.stack(rows, dim=1)


def encoder_reference_points(
    sizes: list[tuple[int, int]], ratios: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Pixel centres of every level, normalised to each image's own area and scaled by the valid
    ratios of every level: (B, S, L, 2) as (x, y)."""
    points = []
    for level, (h, w) in enumerate(sizes):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, device=device),
            torch.linspace(0.5, w - 0.5, w, device=device),
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
        xs = xs.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        points.append(torch.stack((xs, ys), dim=-1))
    reference = torch.cat(points, dim=1)
    return reference[:, :, None] * ratios[:, None]


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """`transformer`: `level_embed` and `encoder.layers.*`."""

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, cfg.conv_dim))
        self.encoder = MSDeformAttnTransformerEncoder(cfg)
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: list[torch.Tensor], pos: list[torch.Tensor], valids: list[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """srcs, pos: per level (B, D, h, w) in the order [1/32, 1/16, 1/8]; valids per level
        (B, 1, h, w) or None. Returns the encoded levels in the same order and shapes."""
        b, device = srcs[0].shape[0], srcs[0].device
        sizes = [tuple(s.shape[-2:]) for s in srcs]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)
        flat_pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(pos)], dim=1
        )
        padding = None
        if valids[0] is not None:
            padding = torch.cat([~v[:, 0].flatten(1).bool() for v in valids], dim=1)
        shapes = torch.as_tensor(sizes, dtype=torch.long, device=device)
        starts = torch.cat((shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]))
        reference = encoder_reference_points(sizes, valid_ratios(valids, b, device), device)
        for layer in self.encoder.layers:
            flat = layer(flat, flat_pos, reference, shapes, starts, padding)
        out = flat.split([h * w for h, w in sizes], dim=1)
        return [o.transpose(1, 2).reshape(b, -1, h, w) for o, (h, w) in zip(out, sizes, strict=True)]


class MSDeformAttnPixelDecoder(nn.Module):
    """`sem_seg_head.pixel_decoder` of the deformable kind (see the module docstring)."""

    def __init__(self, cfg: PixelDecoderConfig, in_channels: list[int]) -> None:
        super().__init__()
        d, g = cfg.conv_dim, cfg.norm_groups
        # res5, res4, res3: low resolution first
        self.input_proj = nn.ModuleList(InputProjection(c, d, g) for c in in_channels[1:][::-1])
        self.transformer = MSDeformAttnTransformerEncoderOnly(cfg)
        self.adapter_1 = ConvNorm(in_channels[0], d, 1, g, relu=False)
        self.layer_1 = ConvNorm(d, d, 3, g, relu=True)
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
        self.conv_dim = d

    def forward(
        self, features: dict[str, torch.Tensor], valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """features res2..res5 (B, C_i, H_i, W_i); valid (B, 1, H/4, W/4) float or None.

        Returns mask_features (B, mask_dim, H/4, W/4), the encoded 1/32 level (B, D, H/32, W/32) and
        the multi-scale features [1/32, 1/16, 1/8], each (B, D, h, w).
        """
        names = ["res5", "res4", "res3"]
        valids = [None if valid is None else valid[:, :, :: 2**i, :: 2**i] for i in (3, 2, 1)]
        srcs = [proj(features[n], v) for proj, n, v in zip(self.input_proj, names, valids, strict=True)]
        pos = [
            sine_position_embedding((s.shape[0], *s.shape[-2:]), self.conv_dim // 2, v, s.device)
            for s, v in zip(srcs, valids, strict=True)
        ]
        multi_scale = self.transformer(srcs, pos, valids)
        if valid is not None:
            multi_scale = [m * v for m, v in zip(multi_scale, valids, strict=True)]
        lateral = self.adapter_1(features["res2"], valid)
        y = lateral + F.interpolate(multi_scale[-1], size=lateral.shape[-2:], mode="nearest")
        y = self.layer_1(y, valid)
        mask_input = y if valid is None else y * valid
        return self.mask_features(mask_input), multi_scale[0], multi_scale
