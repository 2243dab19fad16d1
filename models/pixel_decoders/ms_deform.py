"""The multi-scale deformable attention pixel decoder (Mask2Former's `MSDeformAttnPixelDecoder`, the
`transformer_encoder_deform` of X-Decoder / SEEM, and OpenSeeD's `OpenSeeDEncoder`), with the official
parameter names:

    input_proj.{i}                Conv + GroupNorm per encoder level -> conv_dim (below)
    transformer.level_embed       (num_levels, conv_dim), one row per level in the encoder order
    transformer.encoder.layers.*  post-norm layers: MSDeformAttn self-attention (`self_attn`,
                                  through `openset::ms_deform_attn`), norm1, FFN linear1/linear2, norm2
    adapter_1, layer_1            FPN on res2: lateral 1x1 + GN, merged, then 3x3 + GN + ReLU
    mask_features                 Conv1x1 -> mask_dim at 1/4

Level construction (`PixelDecoderConfig.level_order`), input_proj.i builds encoder level i:

- "coarse_first" (Mask2Former, the demo): Conv1x1 + GN on res5, res4, res3, order [1/32, 1/16, 1/8];
- "fine_first" (OpenSeeD): Conv1x1 + GN on res3, res4, res5, then `num_levels - 3` extra levels, each a
  Conv3x3 stride 2 + GN on the previous one (the first on res5): order [1/8, 1/16, 1/32, 1/64].

Outputs: `mask_features` (B, mask_dim, H/4, W/4) and the encoder levels as maps (B, D, h, w) in the
encoder order (`multi_scale`); `forward_features` adds the flat encoder memory and its level layout.

Padding: with a `valid` mask (B, 1, H/4, W/4) of each image's own area, padded values are zeroed
before sampling (as the kernel's zero padding does outside a map), reference points and offsets are
scaled by each image's valid ratios, GroupNorm statistics and 3x3 convs only see each image's area.
With `fpn_upsample="nearest"` (the demo) batched and single-image features then agree; the official
bilinear merge reads padded neighbours at the edge of an image. OpenSeeD and Mask2Former use no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import PixelDecoderConfig
from models.ops import MSDeformAttn
from models.pixel_decoders.fpn_encoder import ConvNorm, masked_group_norm, sine_position_embedding

BACKBONE_LEVELS = ("res3", "res4", "res5")  # the backbone features the encoder reads, fine to coarse
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class InputProjection(nn.Sequential):
    """`input_proj.i`: Conv (index 0) + GroupNorm (index 1), statistics over each image's area."""

    def __init__(self, in_dim: int, out_dim: int, groups: int, kernel: int = 1, stride: int = 1) -> None:
        conv = nn.Conv2d(in_dim, out_dim, kernel_size=kernel, stride=stride, padding=kernel // 2)
        super().__init__(conv, nn.GroupNorm(groups, out_dim))

    def forward(
        self, x: torch.Tensor, valid_in: torch.Tensor | None = None, valid_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, h, w); valid_in / valid_out: (B, 1, ., .) areas of the input and output maps (a 1x1
        conv keeps the map, so valid_out defaults to valid_in)."""
        if valid_in is not None and self[0].kernel_size[0] > 1:
            x = x * valid_in
        return masked_group_norm(self[0](x), self[1], valid_in if valid_out is None else valid_out)


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
                cfg.conv_dim, cfg.dim_feedforward, cfg.num_levels, cfg.num_heads, cfg.num_points
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


def level_layout(sizes: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`spatial_shapes` (L, 2) int64 rows (h, w) and `level_start_index` (L,) int64 of a flat memory."""
    shapes = torch.as_tensor(sizes, dtype=torch.long, device=device).view(-1, 2)
    starts = torch.cat((shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]))
    return shapes, starts


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per level (B, D, h, w) -> (B, sum h*w, D), levels concatenated in list order."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """`transformer`: `level_embed` and `encoder.layers.*`."""

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(cfg.num_levels, cfg.conv_dim))
        self.encoder = MSDeformAttnTransformerEncoder(cfg)
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: list[torch.Tensor], pos: list[torch.Tensor], valids: list[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """srcs, pos: per level (B, D, h, w) in the encoder order; valids per level (B, 1, h, w) or
        None. Returns the encoded levels in the same order and shapes."""
        b, device = srcs[0].shape[0], srcs[0].device
        sizes = [tuple(s.shape[-2:]) for s in srcs]
        flat = flatten_levels(srcs)
        flat_pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(pos)], dim=1
        )
        padding = None
        if valids[0] is not None:
            padding = torch.cat([~v[:, 0].flatten(1).bool() for v in valids], dim=1)
        shapes, starts = level_layout(sizes, device)
        reference = encoder_reference_points(sizes, valid_ratios(valids, b, device), device)
        for layer in self.encoder.layers:
            flat = layer(flat, flat_pos, reference, shapes, starts, padding)
        out = flat.split([h * w for h, w in sizes], dim=1)
        return [o.transpose(1, 2).reshape(b, -1, h, w) for o, (h, w) in zip(out, sizes, strict=True)]


@dataclass
class EncoderInputs:
    """What enters the deformable encoder, per level in the encoder order."""

    srcs: list[torch.Tensor]  # (B, D, h, w) after input_proj, before positions and level embeddings
    pos: list[torch.Tensor]  # (B, D, h, w) sine position embeddings
    valids: list[torch.Tensor | None]  # (B, 1, h, w) each image's own area, or None


@dataclass
class PixelDecoderOutput:
    """Everything the transformer decoders read from the pixel decoder."""

    mask_features: torch.Tensor  # (B, mask_dim, H/4, W/4)
    multi_scale: list[torch.Tensor]  # encoder levels in the encoder order, each (B, D, h, w)
    memory: torch.Tensor  # (B, S, D): the encoder output flattened in the encoder order
    spatial_shapes: torch.Tensor  # (L, 2) int64 rows (h, w), encoder order
    level_start_index: torch.Tensor  # (L,) int64
    valids: list[torch.Tensor | None]  # per level (B, 1, h, w) or None


class MSDeformAttnPixelDecoder(nn.Module):
    """`sem_seg_head.pixel_decoder` of the deformable kind (see the module docstring)."""

    def __init__(self, cfg: PixelDecoderConfig, in_channels: list[int]) -> None:
        super().__init__()
        d, g = cfg.conv_dim, cfg.norm_groups
        if cfg.level_order not in ("coarse_first", "fine_first"):
            raise ValueError(f"unknown level_order {cfg.level_order!r}")
        if cfg.num_levels < len(BACKBONE_LEVELS) or (
            cfg.level_order == "coarse_first" and cfg.num_levels != len(BACKBONE_LEVELS)
        ):
            raise ValueError(f"num_levels {cfg.num_levels} does not fit level_order {cfg.level_order!r}")
        if cfg.fpn_upsample not in ("nearest", "bilinear"):
            raise ValueError(f"unknown fpn_upsample {cfg.fpn_upsample!r}")
        channels = dict(zip(["res2", *BACKBONE_LEVELS], in_channels, strict=True))
        names = list(BACKBONE_LEVELS) if cfg.level_order == "fine_first" else list(BACKBONE_LEVELS[::-1])
        projections = [InputProjection(channels[n], d, g) for n in names]
        in_dim = channels["res5"]
        for _ in range(cfg.num_levels - len(BACKBONE_LEVELS)):
            projections.append(InputProjection(in_dim, d, g, kernel=3, stride=2))
            in_dim = d
        self.input_proj = nn.ModuleList(projections)
        self.transformer = MSDeformAttnTransformerEncoderOnly(cfg)
        self.adapter_1 = ConvNorm(in_channels[0], d, 1, g, relu=False)
        self.layer_1 = ConvNorm(d, d, 3, g, relu=True)
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
        self.conv_dim = d
        self.level_names = names  # backbone feature of each input_proj.i (the extra levels follow)
        self.fine_first = cfg.level_order == "fine_first"
        self.fpn_upsample = cfg.fpn_upsample

    def encoder_inputs(
        self, features: dict[str, torch.Tensor], valid: torch.Tensor | None = None
    ) -> EncoderInputs:
        """Projected levels, their sine positions and valid masks, in the encoder order."""
        srcs, valids = [], []
        for proj, name in zip(self.input_proj, self.level_names, strict=False):
            v = None if valid is None else valid[:, :, :: STRIDES[name] // 4, :: STRIDES[name] // 4]
            srcs.append(proj(features[name], v))
            valids.append(v)
        previous, v_prev = features["res5"], valids[self.level_names.index("res5")]
        for proj in self.input_proj[len(self.level_names) :]:
            v = None if v_prev is None else v_prev[:, :, ::2, ::2]
            previous = proj(previous, v_prev, v)
            srcs.append(previous)
            valids.append(v)
            v_prev = v
        pos = [
            sine_position_embedding((s.shape[0], *s.shape[-2:]), self.conv_dim // 2, v, s.device)
            for s, v in zip(srcs, valids, strict=True)
        ]
        return EncoderInputs(srcs, pos, valids)

    def forward_features(
        self, features: dict[str, torch.Tensor], valid: torch.Tensor | None = None
    ) -> PixelDecoderOutput:
        """features res2..res5 (B, C_i, H_i, W_i); valid (B, 1, H/4, W/4) float or None."""
        inputs = self.encoder_inputs(features, valid)
        multi_scale = self.transformer(inputs.srcs, inputs.pos, inputs.valids)
        if valid is not None:
            multi_scale = [m * v for m, v in zip(multi_scale, inputs.valids, strict=True)]
        finest = multi_scale[0] if self.fine_first else multi_scale[-1]  # the 1/8 level
        lateral = self.adapter_1(features["res2"], valid)
        if self.fpn_upsample == "bilinear":
            up = F.interpolate(finest, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(finest, size=lateral.shape[-2:], mode="nearest")
        y = self.layer_1(lateral + up, valid)
        mask_input = y if valid is None else y * valid
        shapes, starts = level_layout([tuple(m.shape[-2:]) for m in multi_scale], multi_scale[0].device)
        return PixelDecoderOutput(
            mask_features=self.mask_features(mask_input),
            multi_scale=multi_scale,
            memory=flatten_levels(multi_scale),
            spatial_shapes=shapes,
            level_start_index=starts,
            valids=inputs.valids,
        )

    def forward(
        self, features: dict[str, torch.Tensor], valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """features res2..res5 (B, C_i, H_i, W_i); valid (B, 1, H/4, W/4) float or None.

        Returns mask_features (B, mask_dim, H/4, W/4), the first encoder level (B, D, h, w) and all
        encoder levels in the encoder order, each (B, D, h, w).
        """
        out = self.forward_features(features, valid)
        return out.mask_features, out.multi_scale[0], out.multi_scale
