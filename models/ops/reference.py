"""The portable reference of multi-scale deformable attention, built on `F.grid_sample`.

It follows the PyTorch fallback of the official code step for step (spec section 6) and is the
oracle every kernel is tested against. It runs on any device and dtype and exports to ONNX as
standard operators (GridSample), which makes it the portable ONNX form too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with bilinear `grid_sample` (zero padding, half-pixel centres).

    Args:
        value: (N, S, M, D), all levels concatenated along S, each level row-major.
        spatial_shapes: (L, 2) int64, rows (H_l, W_l).
        level_start_index: (L,) int64; unused here (it is implied by `spatial_shapes`), kept for the
            common operator signature.
        sampling_locations: (N, Lq, M, L, P, 2), normalised (x, y), (0, 0) the top-left corner.
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D), head m in channels m * D ... m * D + D - 1.
    """
    del level_start_index
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W): batch major, head minor.
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    output = (stacked * weights).sum(-1).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous()
