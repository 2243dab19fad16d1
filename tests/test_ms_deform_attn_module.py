"""`MSDeformAttn`: official parameters and initialisation, both reference-point forms, the joint
softmax and the padding mask, each checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from models.ops import MSDeformAttn
from models.ops.synthetic import level_start_index


def identity_projections(module: MSDeformAttn) -> MSDeformAttn:
    with torch.no_grad():
        for linear in (module.value_proj, module.output_proj):
            linear.weight.copy_(torch.eye(module.d_model))
            linear.bias.zero_()
    return module


def test_official_parameter_names_shapes_and_init() -> None:
    module = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    shapes = {name: tuple(p.shape) for name, p in module.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }
    assert torch.all(module.sampling_offsets.weight == 0)
    assert torch.all(module.attention_weights.weight == 0) and torch.all(module.attention_weights.bias == 0)
    assert torch.all(module.value_proj.bias == 0) and torch.all(module.output_proj.bias == 0)
    bias = module.sampling_offsets.bias.view(8, 4, 4, 2)  # (head, level, point, xy)
    for point in range(4):
        assert torch.allclose(bias[0, :, point], torch.tensor([point + 1.0, 0.0]))  # head 0 looks right
        assert torch.allclose(bias[1, :, point], torch.tensor([point + 1.0, point + 1.0]))  # 45 degrees
        assert torch.allclose(bias[2, :, point], torch.tensor([0.0, point + 1.0]), atol=1e-6)  # down
    # xavier_uniform bound for a square d x d layer
    assert module.value_proj.weight.abs().max() <= math.sqrt(6 / 512)


@pytest.mark.parametrize("form", ["points", "boxes"])
def test_initial_offsets_sample_the_neighbouring_pixel(form: str) -> None:
    # Two heads, one level, one point: head 0 samples one pixel right of its reference, head 1 one
    # pixel left (official init), with weight 1; identity projections expose the sampled values.
    height, width = 3, 5
    module = identity_projections(MSDeformAttn(d_model=4, n_levels=1, n_heads=2, n_points=1)).double()
    shapes = torch.tensor([[height, width]])
    features = torch.randn(1, height * width, 4, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = torch.stack([(cols + 0.5) / width, (rows + 0.5) / height], -1).view(1, -1, 1, 2).double()
    if form == "points":
        reference = centres
    else:  # box of width 2 pixels: offset 1 / P * w * 0.5 moves one pixel
        size = torch.tensor([2.0 / width, 1.0 / height], dtype=torch.float64).expand_as(centres)
        reference = torch.cat([centres, size], -1)
    output = module(features, reference, features, shapes, level_start_index(shapes))
    grid = features.view(height, width, 2, 2)  # (row, col, head, channel)
    expected = torch.zeros_like(grid)
    expected[:, :-1, 0] = grid[:, 1:, 0]  # head 0: the right neighbour, zero past the edge
    expected[:, 1:, 1] = grid[:, :-1, 1]  # head 1: the left neighbour
    # atol: the official init computes the directions in float32 (sin(pi) is not 0)
    assert torch.allclose(output.view(height, width, 2, 2), expected, atol=1e-6)


def test_softmax_runs_over_levels_and_points_jointly() -> None:
    module = identity_projections(MSDeformAttn(d_model=2, n_levels=2, n_heads=1, n_points=1)).double()
    with torch.no_grad():
        module.sampling_offsets.bias.zero_()
        module.attention_weights.bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # 3:1 between levels
    shapes = torch.tensor([[2, 2], [1, 1]])
    features = torch.cat([torch.ones(1, 4, 2), torch.zeros(1, 1, 2)], 1).double()
    reference = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64)  # centre of pixel (0, 0) in level 0
    output = module(torch.zeros(1, 1, 2).double(), reference, features, shapes, level_start_index(shapes))
    assert torch.allclose(output, torch.full((1, 1, 2), 0.75, dtype=torch.float64))


def test_padding_mask_zeroes_projected_values_including_bias() -> None:
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = level_start_index(shapes)
    features = torch.randn(2, 26, 16, dtype=torch.float64)
    query = torch.randn(2, 7, 16, dtype=torch.float64)
    reference = torch.rand(2, 7, 2, 4, dtype=torch.float64)
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[0, 3:9] = True
    mask[1, 20:] = True
    masked = module(query, reference, features, shapes, starts, mask)
    # Inputs whose projection is exactly zero at the padded rows must give the same output.
    weight, bias = module.value_proj.weight, module.value_proj.bias
    zero_input = torch.linalg.solve(weight, -bias)
    substituted = torch.where(mask[..., None], zero_input, features)
    assert torch.allclose(masked, module(query, reference, substituted, shapes, starts), atol=1e-10)
    assert not torch.allclose(masked, module(query, reference, features, shapes, starts), atol=1e-3)


def test_shapes_and_reference_forms_are_validated() -> None:
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    shapes = torch.tensor([[2, 3]])
    with pytest.raises(ValueError, match="positions"):
        module(torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 2), torch.zeros(1, 7, 8), shapes, torch.tensor([0]))
    with pytest.raises(ValueError, match="end in 2"):
        module(torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 3), torch.zeros(1, 6, 8), shapes, torch.tensor([0]))
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_levels=1, n_heads=3, n_points=1)
