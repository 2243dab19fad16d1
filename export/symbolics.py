"""ONNX symbolics the TorchScript exporter lacks for X-Decoder's graphs.

`aten::_upsample_bicubic2d_aa` (every mask resize of X-Decoder: bicubic, antialiased,
align_corners=False) becomes one ONNX Resize (opset >= 18, which adds `antialias` and `axes`).
PyTorch's antialiased bicubic filter is PIL's: cubic coefficient a = -0.5, taps outside the input
dropped and the weights renormalised (`exclude_outside=1`), half-pixel centres.
"""

from __future__ import annotations

from typing import Any

import torch

MIN_OPSET = 18
_ONNX_INT64 = 7  # onnx.TensorProto.INT64


def _bicubic_aa_symbolic(
    g: Any, x: Any, output_size: Any, align_corners: Any, scales_h: Any = None, scales_w: Any = None
) -> Any:
    del align_corners, scales_h, scales_w  # X-Decoder always resizes to a size, align_corners=False
    sizes = g.op("Cast", output_size, to_i=_ONNX_INT64)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op(
        "Resize",
        x,
        empty,
        empty,
        sizes,
        axes_i=[2, 3],
        antialias_i=1,
        mode_s="cubic",
        cubic_coeff_a_f=-0.5,
        exclude_outside_i=1,
        coordinate_transformation_mode_s="half_pixel",
    )


def register_symbolics(opset: int) -> None:
    """Register the symbolics above for `opset` (raises below `MIN_OPSET`)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: antialiased Resize needs opset >= {MIN_OPSET}")
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _bicubic_aa_symbolic, opset)
