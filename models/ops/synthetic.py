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
    spread_pixels: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    `n_queries=None` gives one query per map position (encoder style). Locations are uniform in
    [-margin, 1 + margin), so a `margin` above 0 puts points outside the maps. With
    `spread_pixels`, they are instead each query's reference point (its own pixel centre for
    encoder queries, uniform otherwise) plus normal offsets of that many pixels of each level,
    as a trained model samples.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spatial_shapes, dtype=torch.int64).view(-1, 2)
    n_levels = shapes.shape[0]
    n_spatial = int(shapes.prod(1).sum())
    n_queries = n_spatial if n_queries is None else n_queries
    value = torch.randn(batch, n_spatial, n_heads, head_dim, generator=generator)
    locations = torch.rand(batch, n_queries, n_heads, n_levels, n_points, 2, generator=generator)
    locations = locations * (1 + 2 * margin) - margin
    if spread_pixels is not None:
        reference = _reference_points(shapes, n_queries, n_queries == n_spatial, generator)
        pixel = 1.0 / shapes.flip(1).to(torch.float32)  # (L, 2) size of one pixel as (x, y)
        offsets = torch.randn(locations.shape, generator=generator) * spread_pixels * pixel[:, None, :]
        locations = reference[None, :, None, None, None, :] + offsets
    logits = torch.randn(batch, n_queries, n_heads, n_levels * n_points, generator=generator)
    weights = logits.softmax(-1).view(batch, n_queries, n_heads, n_levels, n_points)
    return (
        value.to(dtype),
        shapes,
        level_start_index(shapes),
        locations.to(dtype),
        weights.to(dtype),
    )


def _reference_points(
    shapes: torch.Tensor, n_queries: int, encoder: bool, generator: torch.Generator
) -> torch.Tensor:
    """(Lq, 2) normalised (x, y): pixel centres of every level in order, or uniform points."""
    if not encoder:
        return torch.rand(n_queries, 2, generator=generator)
    centres = []
    for height, width in shapes.tolist():
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        centres.append(torch.stack([(cols + 0.5) / width, (rows + 0.5) / height], -1).view(-1, 2))
    return torch.cat(centres)
