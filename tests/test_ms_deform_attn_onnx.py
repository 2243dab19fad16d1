"""ONNX export of multi-scale deformable attention in both forms, run by ONNX Runtime: the
TensorRT plugin node (through the registered custom op) and the portable GridSample graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from models.ops import GRID_SAMPLE, TRT_PLUGIN, MSDeformAttn, export_onnx, ms_deform_attn_reference
from models.ops.onnx_export import PLUGIN_DOMAIN, PLUGIN_NAME
from models.ops.ort_plugin import ort_session
from models.ops.synthetic import level_start_index, make_inputs

INPUT_NAMES = ["query", "reference_points", "input_flatten", "spatial_shapes", "level_start_index"]
SHAPES = torch.tensor([[6, 7], [3, 4], [1, 1]])  # odd sizes and a 1x1 level


def module_and_inputs(batch: int, n_queries: int, box: bool, seed: int = 0) -> tuple[MSDeformAttn, tuple]:
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    n_spatial = int(SHAPES.prod(1).sum())
    reference = torch.rand(batch, n_queries, 3, 4 if box else 2)
    inputs = (
        torch.randn(batch, n_queries, 32),
        reference,
        torch.randn(batch, n_spatial, 32),
        SHAPES,
        level_start_index(SHAPES),
    )
    return module, inputs


def run_ort(path: Path, inputs: tuple) -> np.ndarray:
    session = ort_session(path)
    names = {i.name for i in session.get_inputs()}
    feeds = {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True) if name in names}
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("form", [TRT_PLUGIN, GRID_SAMPLE])
@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_module_export_matches_torch_in_onnxruntime(tmp_path: Path, form: str, box: bool) -> None:
    module, inputs = module_and_inputs(batch=2, n_queries=5, box=box)
    path = export_onnx(
        module,
        inputs,
        tmp_path / f"msda_{form}.onnx",
        msda_form=form,
        input_names=INPUT_NAMES,
        output_names=["output"],
        dynamic_axes={
            "query": {0: "batch", 1: "queries"},
            "reference_points": {0: "batch", 1: "queries"},
            "input_flatten": {0: "batch"},
            "output": {0: "batch", 1: "queries"},
        },
    )
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    if form == TRT_PLUGIN:
        assert ops.count(PLUGIN_NAME) == 1 and "GridSample" not in ops
    else:
        assert "GridSample" in ops and all(node.domain in ("", "ai.onnx") for node in graph.node)
    # other batch and query counts than at export time
    _, fresh = module_and_inputs(batch=3, n_queries=9, box=box, seed=1)
    with torch.no_grad():
        expected = module(*fresh).numpy()
    assert np.abs(run_ort(path, fresh) - expected).max() < 1e-5


def test_plugin_node_follows_the_tensorrt_contract(tmp_path: Path) -> None:
    module, inputs = module_and_inputs(batch=1, n_queries=4, box=False)
    path = export_onnx(
        module, inputs, tmp_path / "plugin.onnx", msda_form=TRT_PLUGIN, input_names=INPUT_NAMES
    )
    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers = {inp: node for node in model.graph.node for inp in node.input}
    node = next(n for n in model.graph.node if n.op_type == PLUGIN_NAME)
    assert node.domain == PLUGIN_DOMAIN
    assert (PLUGIN_DOMAIN, 1) in {(o.domain, o.version) for o in model.opset_import}
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"plugin_version": b"1", "plugin_namespace": b""}
    assert len(node.input) == 5 and len(node.output) == 1
    for index, graph_input in ((1, "spatial_shapes"), (2, "level_start_index")):
        cast = producers[node.input[index]]
        assert cast.op_type == "Cast" and cast.input[0] == graph_input
        assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.INT32
    reshape = consumers[node.output[0]]
    assert reshape.op_type == "Reshape"


def test_bare_plugin_node_runs_with_int32_indices_and_4d_output() -> None:
    value, shapes, starts, locations, weights = make_inputs(
        [(5, 3), (1, 1), (2, 7)], batch=2, n_queries=6, n_heads=3, head_dim=4, n_points=2, margin=0.3
    )
    n, _, m, d = value.shape
    float_input = TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node(
                PLUGIN_NAME,
                ["value", "shapes", "starts", "locations", "weights"],
                ["out"],
                domain=PLUGIN_DOMAIN,
                plugin_version="1",
                plugin_namespace="",
            )
        ],
        "plugin_only",
        [
            helper.make_tensor_value_info("value", float_input, list(value.shape)),
            helper.make_tensor_value_info("shapes", TensorProto.INT32, [3, 2]),
            helper.make_tensor_value_info("starts", TensorProto.INT32, [3]),
            helper.make_tensor_value_info("locations", float_input, list(locations.shape)),
            helper.make_tensor_value_info("weights", float_input, list(weights.shape)),
        ],
        [helper.make_tensor_value_info("out", float_input, [n, 6, m, d])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(PLUGIN_DOMAIN, 1)]
    )
    feeds = {
        "value": value.numpy(),
        "shapes": shapes.numpy().astype(np.int32),
        "starts": starts.numpy().astype(np.int32),
        "locations": locations.numpy(),
        "weights": weights.numpy(),
    }
    output = ort_session(model).run(None, feeds)[0]
    assert output.shape == (n, 6, m, d)
    expected = ms_deform_attn_reference(value, shapes, starts, locations, weights).view(n, 6, m, d)
    assert np.abs(output - expected.numpy()).max() < 1e-5
