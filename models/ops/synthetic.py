"""Random inputs for multi-scale deformable attention, drawn like the golden cases (values
standard normal, locations uniform in [-0.1, 1.1), weights softmaxed over L * P); used by the
tests and the benchmark."""

from __future__ import annotations

import torch


def level_start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L,) int64 offsets [0, H0*W0, H0*W0 + H1*W1, ...] for (L, 2) rows (H, W)."""
    sizes = spatial_shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def make_inputs(
    spatial_shapes: list[tuple[int, int]],
    batch: int = 1,
    n_queries: int | None = None,
    n_heads: int = 8,
    head_dim: int = 32,
    n_points: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    margin: float = 0.1,
) -> tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    `n_queries=None` gives one query per map position (encoder style). Locations are uniform in
    [-margin, 1 + margin), so a `margin` above 0 puts points outside the maps.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spatial_shapes, dtype=torch.int64).view(-1, 2)
    n_levels = shapes.shape[0]
    n_spatial = int(shapes.prod(1).sum())
    n_queries = n_spatial if n_queries is None else n_queries
    value = torch.randn(batch, n_spatial, n_heads, head_dim, generator=generator)
    locations = torch.rand(batch, n_queries, n_heads, n_levels, n_points, 2, generator=generator)
    locations = locations * (1 + 2 * margin) - margin
    logits = torch.randn(batch, n_queries, n_heads, n_levels * n_points, generator=generator)
    weights = logits.softmax(-1).view(batch, n_queries, n_heads, n_levels, n_points)
    return (
        value.to(dtype),
        shapes,
        level_start_index(shapes),
        locations.to(dtype),
        weights.to(dtype),
    )
