"""FocalNet backbones of X-Decoder, with the official parameter names.

Two variants share this file:

- `focal_dw` (Focal-T): depthwise 3x3 convs `dw1` / `dw2` around the modulation and the MLP, post-LN
  applied to the residual sum, stem conv padding 3.
- `focal` (Focal-L): no depthwise convs, post-LN applied to the branch output, stem conv padding 2.

Position table (`FocalNetConfig.position_table`, the demo config only; no released FocalNet has one):
a learned (1, C, S, S) `absolute_pos_embed`, Swin's `ape`, added to the stem output. It is cut to the
patch grid from the top left rather than resized, so padding a batch does not move it under an image;
a grid larger than S x S is a `ValueError`.

Feature maps run channels-last (B, H, W, C) inside the stages and are returned NCHW.

Padding. A batch of images of different sizes is zero-padded to a common size. `valid` masks
(B, 1, H, W) mark each image's own area (its size rounded up to a multiple of 32); outside it the
features are zeroed before every spatial op and excluded from the global context mean, so an image
gives the same features in a batch as alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import FocalNetConfig


def mask_outside(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero an NCHW map outside each image's area; `valid` is (B, 1, H, W) float or None."""
    return x if valid is None else x * valid


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FocalModulation(nn.Module):
    """Focal modulation: gated hierarchical depthwise contexts multiplied into a query projection."""

    def __init__(self, dim: int, focal_levels: int, focal_window: int) -> None:
        super().__init__()
        self.focal_levels = focal_levels
        self.f = nn.Linear(dim, 2 * dim + focal_levels + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for level in range(focal_levels):
            k = 2 * level + focal_window
            conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False)
            self.focal_layers.append(nn.Sequential(conv, nn.GELU()))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        c = x.shape[-1]
        q, ctx, gates = self.f(x).permute(0, 3, 1, 2).split([c, c, self.focal_levels + 1], dim=1)
        ctx_all = 0.0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(mask_outside(ctx, valid))
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        if valid is None:
            ctx_global = ctx.mean(dim=(2, 3), keepdim=True)
        else:
            ctx_global = (ctx * valid).sum(dim=(2, 3), keepdim=True) / valid.sum(dim=(2, 3), keepdim=True)
        ctx_all = ctx_all + self.act(ctx_global) * gates[:, self.focal_levels :]
        ctx_all = ctx_all / (self.focal_levels + 1)
        out = q * self.h(ctx_all)
        return self.proj(out.permute(0, 2, 3, 1))


class FocalBlock(nn.Module):
    """One FocalNet block with layer scale and post-LN (placement depends on the variant)."""

    def __init__(self, dim: int, cfg: FocalNetConfig) -> None:
        super().__init__()
        self.use_dw = cfg.variant == "focal_dw"
        if self.use_dw:
            self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, cfg.focal_levels, cfg.focal_window)
        if self.use_dw:
            self.dw2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), 1e-4))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-4))

    def _depthwise(self, conv: nn.Conv2d, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """x + conv(x) for channels-last x, the conv running NCHW."""
        y = conv(mask_outside(x.permute(0, 3, 1, 2), valid))
        return x + y.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if self.use_dw:
            x = self._depthwise(self.dw1, x, valid)
            x = self.norm1(x + self.gamma_1 * self.modulation(x, valid))
            x = self._depthwise(self.dw2, x, valid)
            return self.norm2(x + self.gamma_2 * self.mlp(x))
        x = x + self.gamma_1 * self.norm1(self.modulation(x, valid))
        return x + self.gamma_2 * self.norm2(self.mlp(x))


class PatchEmbed(nn.Module):
    """Strided conv + LayerNorm: the stem (k7 s4) and the downsampling between stages (k3 s2 p1)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_dim, out_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H', W', C'); pads right/bottom to a multiple of the stride first."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.stride, 0, -h % self.stride))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class FocalStage(nn.Module):
    """`layers.{i}`: the blocks of one stage and the downsampling that follows it (stages 0..2)."""

    def __init__(self, dim: int, depth: int, cfg: FocalNetConfig, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FocalBlock(dim, cfg) for _ in range(depth))
        self.downsample = PatchEmbed(dim, 2 * dim, 3, 2, 1) if downsample else None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the stage output (B, H, W, C) and the input of the next stage."""
        for block in self.blocks:
            x = block(x, valid)
        if self.downsample is None:
            return x, x
        return x, self.downsample(mask_outside(x.permute(0, 3, 1, 2), valid))


class FocalNet(nn.Module):
    """FocalNet backbone returning {"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)}."""

    def __init__(self, cfg: FocalNetConfig) -> None:
        super().__init__()
        stem_padding = 3 if cfg.variant == "focal_dw" else 2
        self.patch_embed = PatchEmbed(3, cfg.embed_dim, 7, cfg.patch_size, stem_padding)
        self.absolute_pos_embed: nn.Parameter | None = None
        if cfg.position_table:
            side = cfg.position_table
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_dim, side, side))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        dims = cfg.out_channels
        last = len(cfg.depths) - 1
        self.layers = nn.ModuleList(
            FocalStage(dims[i], depth, cfg, downsample=i < last) for i, depth in enumerate(cfg.depths)
        )
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self.out_channels = dims

    def position_table(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C): the top-left h x w patches of the absolute position table."""
        assert self.absolute_pos_embed is not None
        side, patch = self.absolute_pos_embed.shape[-1], self.patch_embed.stride
        if h > side or w > side:
            raise ValueError(
                f"an input of {h * patch}x{w * patch} pixels has more patches ({h}x{w}) "
                f"than the backbone's position table ({side}x{side})"
            )
        return self.absolute_pos_embed[:, :, :h, :w].permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W); valid (B, 1, H, W) float mask of each image's area or None."""
        x = self.patch_embed(images)  # (B, H/4, W/4, C)
        if self.absolute_pos_embed is not None:
            x = x + self.position_table(x.shape[1], x.shape[2])
        features = {}
        for i, stage in enumerate(self.layers):
            stride = 4 * 2**i
            valid_i = None if valid is None else valid[:, :, ::stride, ::stride]
            out, x = stage(x, valid_i)
            out = getattr(self, f"norm{i}")(out)
            features[f"res{i + 2}"] = out.permute(0, 3, 1, 2).contiguous()
        return features
