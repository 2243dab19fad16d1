"""`ms_deform_attn`: the function models call; it runs `openset::ms_deform_attn`, except while
exporting to ONNX in the portable form, where it traces the grid_sample reference instead."""

from __future__ import annotations

import torch

from models.ops.onnx_export import GRID_SAMPLE, current_onnx_form
from models.ops.op import ms_deform_attn_op
from models.ops.reference import ms_deform_attn_reference


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (spec section 6).

    Args:
        value: (N, S, M, D), levels concatenated along S, each level row-major.
        spatial_shapes: (L, 2) int64 rows (H_l, W_l).
        level_start_index: (L,) int64 offsets of the levels in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); (0, 0) top-left corner.
        attention_weights: (N, Lq, M, L, P), already softmaxed over L * P.

    Returns:
        (N, Lq, M * D), head m in channels m * D ... m * D + D - 1.
    """
    if torch.onnx.is_in_onnx_export() and current_onnx_form() == GRID_SAMPLE:
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
