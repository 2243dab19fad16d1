"""Launches the Triton kernel of multi-scale deformable attention (GPU; CPU with `TRITON_INTERPRET=1`).

Inputs may be float32, float16 or bfloat16 (fp32 accumulation); the output has the input dtype.
Triton is optional: `triton_available()` says whether `ms_deform_attn_triton` can run.

Triton reads `TRITON_INTERPRET` when it is imported, so the interpreter must be chosen in the
environment of the process (the tests start a subprocess for it).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # the project runs without Triton; `triton_available()` reports it
    triton = None


def triton_available() -> bool:
    """True when Triton is importable (GPU kernels, or the interpreter on CPU)."""
    return triton is not None


def interpreter_enabled() -> bool:
    """True when `TRITON_INTERPRET=1`, i.e. Triton kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    block_q: int = 32,
) -> torch.Tensor:
    """Triton multi-scale deformable attention; same arguments and result as the reference.

    value (N, S, M, D); spatial_shapes (L, 2); level_start_index (L,); sampling_locations
    (N, Lq, M, L, P, 2); attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D) in value's dtype.
    Tensors must be on a CUDA device, or on the CPU with `TRITON_INTERPRET=1`.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; install the 'gpu' extra or use the reference")
    if value.device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError("the Triton kernel needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    value = value.contiguous()
    # Locations and weights keep their own float dtype: the kernel reads them as fp32.
    locations = sampling_locations.contiguous()
    weights = attention_weights.contiguous()
    shapes = spatial_shapes.to(device=value.device, dtype=torch.int32).contiguous()
    starts = level_start_index.to(device=value.device, dtype=torch.int32).contiguous()
    output = torch.empty((n, lq, m * d), dtype=value.dtype, device=value.device)
    n_rows = n * lq
    if n_rows == 0 or m * d == 0:
        return output.zero_()
    from models.ops.triton_kernel import msda_kernel

    grid = (triton.cdiv(n_rows, block_q), m)
    msda_kernel[grid](
        value,
        shapes,
        starts,
        locations,
        weights,
        output,
        n_rows,
        lq,
        s,
        n_levels,
        N_HEADS=m,
        N_POINTS=n_points,
        DEPTH=d,
        BLOCK_Q=block_q,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return output
