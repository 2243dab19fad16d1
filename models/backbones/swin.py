"""The Swin Transformer backbone (shifted-window attention) of OpenSeeD and Mask2Former, with the
official parameter names of the detection variant (`D2SwinTransformer`):

    patch_embed.proj / .norm                  Conv k4 s4 stem + LayerNorm
    layers.{i}.blocks.{j}.norm1 / .attn / .norm2 / .mlp.fc1 / .mlp.fc2
    layers.{i}.blocks.{j}.attn.qkv / .proj / .relative_position_bias_table
    layers.{i}.downsample.norm / .reduction   patch merging after stages 0..2
    norm0..norm3                              LayerNorm on each stage output

`relative_position_index` is a non-persistent buffer rebuilt at construction: the official
checkpoints do not carry it, and a strict load of their keys works.

Feature maps run channels-last (B, H, W, C) inside the stages and are returned NCHW. Inputs that are
not a multiple of the patch size are zero-padded bottom/right, and every stage zero-pads its (normed)
tokens bottom/right to a multiple of the window, as the official code does; there is no padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones.focalnet import Mlp  # the same fc1 / GELU / fc2 block

MASKED = -100.0  # the official additive mask between the regions of a shifted window


@dataclass
class SwinConfig:
    """Swin backbone; the defaults are Swin-T."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    patch_size: int = 4

    @property
    def out_channels(self) -> list[int]:
        """Channels of res2..res5: embed_dim * 2**i."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) int64: row of `relative_position_bias_table` for each (query, key) pair."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * nW, window², C), windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, window², C) -> (B, H, W, C), the inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(nW, window², window²) additive mask for a (h, w) map (multiples of `window`) rolled by
    -shift: 0 between tokens of the same region, -100 between tokens that the roll brought together."""
    regions = torch.zeros(1, h, w, 1, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            regions[:, rows, cols, :] = label
            label += 1
    windows = window_partition(regions, window).squeeze(-1)  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B * nW, N, C); mask (nW, N, N) additive or None -> (B * nW, N, C)."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B * nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(bw, -1, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted) window attention + residual, MLP + residual."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, H, W, C); mask: the stage's shifted-window mask (used when this block shifts)."""
        _, h, w, c = x.shape
        ws, s = self.window, self.shift
        y = F.pad(self.norm1(x), (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = y.shape[1:3]
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask if s else None)
        y = window_reverse(y, ws, hp, wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y[:, :h, :w, :]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation (4C), LayerNorm, then Linear 4C -> 2C without bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded bottom/right."""
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`layers.{i}`: blocks alternating plain and shifted windows, then patch merging (stages 0..2)."""

    def __init__(self, dim: int, depth: int, num_heads: int, cfg: SwinConfig, downsample: bool) -> None:
        super().__init__()
        self.window = cfg.window_size
        self.shift = cfg.window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, cfg.window_size, 0 if i % 2 == 0 else self.shift, cfg.mlp_ratio)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, H, W, C) -> the stage output (B, H, W, C) and the input of the next stage."""
        h, w = x.shape[1:3]
        # Rounded up as (h + window - 1) // window: the ONNX exporter writes a floor division of a
        # negative number as a truncating one.
        hp = (h + self.window - 1) // self.window * self.window
        wp = (w + self.window - 1) // self.window * self.window
        mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x, (x if self.downsample is None else self.downsample(x))


class PatchEmbed(nn.Module):
    """Conv k=s=patch (zero-padding the input bottom/right to a multiple of it) + LayerNorm."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, ceil(H/patch), ceil(W/patch), C)."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.patch, 0, -h % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Swin backbone returning {"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)} after the
    output norms (sizes rounded up for inputs that are not multiples of 32)."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        dims = cfg.out_channels
        last = len(cfg.depths) - 1
        self.layers = nn.ModuleList(
            SwinStage(dims[i], depth, cfg.num_heads[i], cfg, downsample=i < last)
            for i, depth in enumerate(cfg.depths)
        )
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self.out_channels = dims

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) -> res2..res5, each (B, C_i, H_i, W_i)."""
        x = self.patch_embed(images)
        features = {}
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            out = getattr(self, f"norm{i}")(out)
            features[f"res{i + 2}"] = out.permute(0, 3, 1, 2).contiguous()
        return features
