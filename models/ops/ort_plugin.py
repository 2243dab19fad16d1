"""Runs both ONNX forms of multi-scale deformable attention with ONNX Runtime.

The portable (GridSample) form needs nothing. The TensorRT-plugin form needs an implementation
of the `MultiscaleDeformableAttnPlugin_TRT` node on ONNX Runtime's side. It is registered through
onnxruntime-extensions' Python custom-op mechanism (`onnx_op`), which ONNX Runtime loads as a
custom-op library; the node's body calls `openset::ms_deform_attn` (the C++ CPU kernel) and
returns the plugin's 4-d output (N, Lq, M, D). onnxruntime-extensions serves Python ops only in
its own domain, so `ort_session` moves plugin nodes into that domain in an in-memory copy of the
model; the file on disk keeps the TensorRT domain.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from models.ops.onnx_export import PLUGIN_NAME
from models.ops.op import ms_deform_attn_op


def plugin_forward(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    level_start_index: np.ndarray,
    sampling_locations: np.ndarray,
    attention_weights: np.ndarray,
) -> np.ndarray:
    """The plugin's contract on numpy arrays: int32 index inputs, output (N, Lq, M, D)."""
    n, _, m, d = value.shape
    output = ms_deform_attn_op(
        torch.from_numpy(np.ascontiguousarray(value)),
        torch.from_numpy(spatial_shapes.astype(np.int64)),
        torch.from_numpy(level_start_index.astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(sampling_locations)),
        torch.from_numpy(np.ascontiguousarray(attention_weights)),
    )
    return output.view(n, -1, m, d).numpy()


@functools.cache
def _register_python_op() -> str:
    """Declare the plugin node to onnxruntime-extensions once; returns its domain."""
    from onnxruntime_extensions import PyCustomOpDef, default_opset_domain, onnx_op

    onnx_op(
        op_type=PLUGIN_NAME,
        inputs=[
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_int32,
            PyCustomOpDef.dt_int32,
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_float,
        ],
        outputs=[PyCustomOpDef.dt_float],
        attrs={"plugin_version": PyCustomOpDef.dt_string, "plugin_namespace": PyCustomOpDef.dt_string},
    )(_plugin_node)
    return default_opset_domain()


def _plugin_node(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    level_start_index: np.ndarray,
    sampling_locations: np.ndarray,
    attention_weights: np.ndarray,
    plugin_version: str = "1",
    plugin_namespace: str = "",
) -> np.ndarray:
    del plugin_version, plugin_namespace  # carried for TensorRT; one implementation here
    return plugin_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def has_plugin_nodes(model: onnx.ModelProto) -> bool:
    """True when the graph holds at least one TensorRT multi-scale deformable attention node."""
    return any(node.op_type == PLUGIN_NAME for node in model.graph.node)


def ort_session(
    model: str | Path | onnx.ModelProto, providers: list[str] | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session for either form (CPU provider unless `providers` is given)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    options = ort.SessionOptions()
    if has_plugin_nodes(proto):
        from onnxruntime_extensions import get_library_path

        domain = _register_python_op()
        proto = _move_plugin_nodes(proto, domain)
        options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=providers or ["CPUExecutionProvider"]
    )


def _move_plugin_nodes(model: onnx.ModelProto, domain: str) -> onnx.ModelProto:
    """A copy of `model` whose plugin nodes live in `domain` (declared in opset_import)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == PLUGIN_NAME:
            node.domain = domain
    if all(entry.domain != domain for entry in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return copy
