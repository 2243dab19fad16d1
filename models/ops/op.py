"""`openset::ms_deform_attn`: the operator registered with `torch.library`, dispatched by device.

- CPU: the C++/OpenMP kernel (`cpu_kernel.py`), or the grid_sample reference when it could not
  be built (one warning).
- CUDA: the Triton kernel (`triton_kernel.py`) when Triton is installed, else the reference.
- Any other device: the reference.
- Fake tensors (torch.export, torch.compile, meta): shape (N, Lq, M * D), value's dtype.

No autograd formula is registered: the operator serves inference.
"""

from __future__ import annotations

import torch

from models.ops.cpu_kernel import load_cpu_extension
from models.ops.reference import ms_deform_attn_reference
from models.ops.triton_op import ms_deform_attn_triton, triton_available


@torch.library.custom_op("openset::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Default implementation for devices without a dedicated kernel: the reference."""
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_op.register_kernel("cpu")
def _cpu(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    extension = load_cpu_extension()
    if extension is None:
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_op.register_kernel("cuda")
def _cuda(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    if not triton_available():
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_triton(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_op.register_fake
def _fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    torch._check(value.dim() == 4, lambda: "value must be (N, S, M, D)")
    torch._check(sampling_locations.dim() == 6, lambda: "sampling_locations must be (N, Lq, M, L, P, 2)")
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))
