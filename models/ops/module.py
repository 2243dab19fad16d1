"""`MSDeformAttn`: the multi-scale deformable attention module of Deformable DETR, as used by
Mask2Former, MaskDINO, OpenSeeD and SEEM (same parameter names, initialisation and forward call)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from models.ops.functional import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to `n_points` sampled positions per head and level around its reference.

    Args:
        d_model: channels of queries and values (d); must be divisible by n_heads.
        n_levels: number of feature levels (L).
        n_heads: attention heads (M); head dim D = d_model // n_heads.
        n_points: sampling points per head and level (P).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn("a head dim that is a power of 2 is faster on the GPU kernels", stacklevel=2)
        self.im2col_step = 128  # kept for parity with the official module; unused here
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The official initialisation: point k of head m starts k+1 steps along direction m."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from queries to the flattened multi-level features.

        Args:
            query: (N, Lq, d).
            reference_points: (N, Lq, L, 2) normalised (x, y), or boxes (N, Lq, L, 4) as
                (cx, cy, w, h); (0, 0) is the top-left corner, (1, 1) the bottom-right one.
            input_flatten: (N, S, d), levels concatenated in `input_spatial_shapes` order.
            input_spatial_shapes: (L, 2) int64 rows (H_l, W_l).
            input_level_start_index: (L,) int64 offsets of the levels in S.
            input_padding_mask: (N, S) bool, True = padding; those values are zeroed after
                `value_proj`.

        Returns:
            (N, Lq, d).
        """
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            total = int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())
            if total != len_in:
                raise ValueError(f"input_spatial_shapes cover {total} positions, input_flatten has {len_in}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, len_q, m, n_levels, n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, m, n_levels * n_points)
        weights = F.softmax(weights, -1).view(n, len_q, m, n_levels, n_points)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[
                None, None, None, :, None, :
            ].to(offsets.dtype)
        elif reference_points.shape[-1] == 4:
            # offsets are in units of half the box size, divided by the number of points
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got {reference_points.shape[-1]}"
            )
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(output)
