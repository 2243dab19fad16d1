"""ONNX export of `openset::ms_deform_attn` in two forms, chosen with `export_onnx(..., msda_form=...)`.

`"trt_plugin"` writes one node that TensorRT's built-in plugin runs. Facts of that plugin
(TensorRT `plugin/multiscaleDeformableAttnPlugin`, creator name and version below):

- name `MultiscaleDeformableAttnPlugin_TRT`, version "1" (IPluginV2DynamicExt; version "2" is the
  IPluginV3 port with the same inputs and outputs), empty plugin namespace, no plugin fields;
- five inputs in this order: value (N, S, M, D), spatial_shapes (L, 2) **int32**,
  level_start_index (L,) **int32**, sampling_locations (N, Lq, M, L, P, 2), attention_weights
  (N, Lq, M, L, P); value, locations and weights share one dtype, float32 or float16;
- one output (N, Lq, M, D) in value's dtype (4-d: heads not merged).

The ONNX parser of TensorRT imports an unknown op type as the plugin of the same name, reading
the optional node attributes `plugin_version` and `plugin_namespace`; the node's domain is not
used for the lookup, so it is written as `trt.plugins`. The exported graph casts the two index
inputs to int32 before the node and reshapes its output back to (N, Lq, M * D) after it.

`"grid_sample"` traces the reference (`reference.py`) instead: standard ONNX ops only, with
GridSample (opset >= 16), which any runtime runs. The level sizes become constants of that graph
(the exporter's TracerWarnings about `tolist` say so): it serves the input size it was exported
at, while batch and query counts stay dynamic. The plugin form reads the sizes at run time.

Exports use the TorchScript-based exporter (`dynamo=False`) with a symbolic registered for the
custom op.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TRT_PLUGIN = "trt_plugin"
GRID_SAMPLE = "grid_sample"
FORMS = (TRT_PLUGIN, GRID_SAMPLE)

PLUGIN_NAME = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
PLUGIN_DOMAIN = "trt.plugins"
DEFAULT_OPSET = 17

_ONNX_INT32 = 6  # onnx.TensorProto.INT32
_form: contextvars.ContextVar[str] = contextvars.ContextVar("openset_msda_onnx_form", default=TRT_PLUGIN)


def current_onnx_form() -> str:
    """The form `ms_deform_attn` takes while an ONNX export is running."""
    return _form.get()


@contextlib.contextmanager
def onnx_form(form: str) -> Iterator[None]:
    """Select the ONNX form of multi-scale deformable attention inside the block."""
    if form not in FORMS:
        raise ValueError(f"msda_form must be one of {FORMS}, got {form!r}")
    token = _form.set(form)
    try:
        yield
    finally:
        _form.reset(token)


def _plugin_symbolic(
    g: Any,
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
) -> Any:
    """TorchScript-exporter symbolic: int32 casts, the plugin node (N, Lq, M, D), reshape to 3-d."""
    shapes_i32 = g.op("Cast", spatial_shapes, to_i=_ONNX_INT32)
    starts_i32 = g.op("Cast", level_start_index, to_i=_ONNX_INT32)
    output_4d = g.op(
        f"{PLUGIN_DOMAIN}::{PLUGIN_NAME}",
        value,
        shapes_i32,
        starts_i32,
        sampling_locations,
        attention_weights,
        plugin_version_s=PLUGIN_VERSION,
        plugin_namespace_s=PLUGIN_NAMESPACE,
    )
    keep_n_lq = g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64))
    return g.op("Reshape", output_4d, keep_n_lq)


def register_onnx_symbolic(opset_version: int = DEFAULT_OPSET) -> None:
    """Teach the TorchScript exporter to write `openset::ms_deform_attn` as the plugin node."""
    torch.onnx.register_custom_op_symbolic("openset::ms_deform_attn", _plugin_symbolic, opset_version)


def export_onnx(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    path: str | Path,
    *,
    msda_form: str = TRT_PLUGIN,
    opset_version: int = DEFAULT_OPSET,
    **export_kwargs: Any,
) -> Path:
    """Export `model(*args)` to `path` with multi-scale deformable attention in `msda_form`.

    `export_kwargs` go to `torch.onnx.export` (input_names, output_names, dynamic_axes, ...).
    """
    register_onnx_symbolic(opset_version)
    custom_opsets = {PLUGIN_DOMAIN: 1} if msda_form == TRT_PLUGIN else None
    with onnx_form(msda_form), torch.no_grad():
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset_version,
            custom_opsets=custom_opsets,
            **export_kwargs,
        )
    return Path(path)
