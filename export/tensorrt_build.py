"""TensorRT engines from an ONNX export (`openset export tensorrt --onnx DIR --out DIR`).

One engine per ONNX graph, each with the optimisation profiles of `export.tensorrt_profiles`, and a
manifest of kind "tensorrt" (the ONNX manifest's identity, engine checksums, the profiles). The
multi-scale deformable attention nodes of a plugin-form export are imported by TensorRT's ONNX
parser as its built-in `MultiscaleDeformableAttnPlugin_TRT`; `plugin_node_problems` checks the
node contract first, so a wrong graph fails before a long build.

`tensorrt` is imported only inside `build_engines` (TensorRT is a GPU-machine install: the
`tensorrt` extra); everything else here runs anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto

from export.manifest import GraphEntry, Manifest, config_from_dict, read_manifest
from export.tensorrt_profiles import TASK_GRAPHS, graph_profiles, image_profiles
from models.checkpoint import file_sha256
from models.ops.onnx_export import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

logger = logging.getLogger(__name__)

Shapes = dict[str, list[list[int]]]


def input_dims(path: Path) -> dict[str, list[int | str]]:
    """Graph inputs of an ONNX file -> their dims (int, or the dynamic axis name)."""
    model = onnx.load(str(path), load_external_data=False)
    dims: dict[str, list[int | str]] = {}
    for value in model.graph.input:
        shape = value.type.tensor_type.shape.dim
        dims[value.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in shape]
    return dims


def plan_profiles(
    onnx_dir: Path, tasks: list[str] | None = None, max_batch_size: int = 8, max_retrieve_items: int = 32
) -> dict[str, list[Shapes]]:
    """Per ONNX file of the export, the optimisation profiles its engine gets (graphs that none of
    `tasks` runs are left out; the text encoder is always in)."""
    manifest = read_manifest(onnx_dir, check_files=False)
    profiles = image_profiles(config_from_dict(manifest.config), max_batch_size, max_retrieve_items, tasks)
    wanted = {"text_encoder"} | {g for p in profiles for g in TASK_GRAPHS[p.task]}
    plan = {}
    for entry in manifest.graphs:
        if entry.name not in wanted:
            continue
        size = None if entry.size is None else (entry.size[0], entry.size[1])
        shapes = graph_profiles(entry.name, input_dims(onnx_dir / entry.file), profiles, size)
        if shapes:
            plan[entry.file] = shapes
    return plan


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    out = {}
    for v in values:
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, [d.dim_param or int(d.dim_value) for d in t.shape.dim])
    return out


def plugin_node_problems(model: onnx.ModelProto) -> list[str]:
    """What breaks the contract of TensorRT's deformable-attention plugin in `model` (empty: fine).

    Contract: op type `MultiscaleDeformableAttnPlugin_TRT`, attributes plugin_version "1" and
    plugin_namespace "", five inputs value (N, S, M, D) float, spatial_shapes (L, 2) int32,
    level_start_index (L,) int32, sampling_locations (N, Lq, M, L, P, 2) float, attention_weights
    (N, Lq, M, L, P) float, one output.
    """
    types = _value_types(model)
    expected = [
        ("value", TensorProto.FLOAT, 4),
        ("spatial_shapes", TensorProto.INT32, 2),
        ("level_start_index", TensorProto.INT32, 1),
        ("sampling_locations", TensorProto.FLOAT, 6),
        ("attention_weights", TensorProto.FLOAT, 5),
    ]
    problems = []
    for node in model.graph.node:
        if node.op_type != PLUGIN_NAME:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("plugin_version") != PLUGIN_VERSION.encode():
            problems.append(f"{node.name}: plugin_version {attrs.get('plugin_version')!r}")
        if attrs.get("plugin_namespace", b"") != PLUGIN_NAMESPACE.encode():
            problems.append(f"{node.name}: plugin_namespace {attrs.get('plugin_namespace')!r}")
        if len(node.input) != 5 or len(node.output) != 1:
            problems.append(
                f"{node.name}: {len(node.input)} inputs and {len(node.output)} outputs, expected 5 and 1"
            )
            continue
        for name, (role, dtype, rank) in zip(node.input, expected, strict=True):
            found = types.get(name)
            if found is None:
                problems.append(f"{node.name}: input {role} ({name}) has no inferred type")
            elif found[0] != dtype or len(found[1]) != rank:
                problems.append(
                    f"{node.name}: input {role} is {TensorProto.DataType.Name(found[0])} "
                    f"rank {len(found[1])}, expected {TensorProto.DataType.Name(dtype)} rank {rank}"
                )
        value, shapes, starts, locations, weights = (types.get(n, (0, []))[1] for n in node.input)
        if (
            len(value) == 4
            and len(shapes) == 2
            and len(starts) == 1
            and len(locations) == 6
            and len(weights) == 5
        ):
            pairs = [
                ("heads", value[2], locations[2]),
                ("heads", weights[2], locations[2]),
                ("levels", shapes[0], locations[3]),
                ("levels", starts[0], locations[3]),
                ("levels", weights[3], locations[3]),
                ("points", weights[4], locations[4]),
                ("batch", value[0], locations[0]),
                ("(h, w) pair", shapes[1], 2),
                ("(x, y) pair", locations[5], 2),
            ]
            for what, a, b in pairs:
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    problems.append(f"{node.name}: {what} disagree between inputs ({a} vs {b})")
    return problems


def build_engines(
    onnx_dir: str | Path,
    out: str | Path,
    fp16: bool = False,
    tasks: list[str] | None = None,
    max_batch_size: int = 8,
    workspace_gib: float = 4.0,
) -> Manifest:
    """Build one engine per graph into `out` and write its manifest; needs TensorRT and a GPU."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(
            "TensorRT is not installed: install the `tensorrt` extra (pip install '.[tensorrt]') on a "
            "machine with an NVIDIA GPU"
        ) from exc
    onnx_dir, out = Path(onnx_dir), Path(out)
    source = read_manifest(onnx_dir)
    if source.kind != "onnx":
        raise ValueError(f"{onnx_dir} is not an ONNX export")
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_profiles(onnx_dir, tasks, max_batch_size)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(trt_logger, "")
    entries = []
    for entry in source.graphs:
        if entry.file not in plan:
            continue
        problems = plugin_node_problems(onnx.load(str(onnx_dir / entry.file)))
        if problems:
            raise ValueError(f"{entry.file}: plugin node contract broken: " + "; ".join(problems))
        engine_file = Path(entry.file).with_suffix(".engine").name
        logger.info("building %s (%d profiles)", engine_file, len(plan[entry.file]))
        data = _build_one(trt, trt_logger, onnx_dir / entry.file, plan[entry.file], fp16, workspace_gib)
        (out / engine_file).write_bytes(data)
        entries.append(dataclasses.replace(entry, file=engine_file, sha256=file_sha256(out / engine_file)))
    manifest = dataclasses.replace(
        source,
        kind="tensorrt",
        graphs=entries,
        extra={
            **source.extra,
            "onnx_manifest_sha256": file_sha256(onnx_dir / "manifest.json"),
            "fp16": fp16,
            "tensorrt": trt.__version__,
            "profiles": {file: len(p) for file, p in plan.items()},
            "max_batch_size": max_batch_size,
        },
    )
    manifest.write(out)
    shutil.copy(onnx_dir / "manifest.json", out / "onnx_manifest.json")
    return manifest


def _build_one(
    trt, trt_logger, path: Path, profiles: list[Shapes], fp16: bool, workspace_gib: float
) -> bytes:  # noqa: ANN001
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise RuntimeError(f"TensorRT could not build {path.name} (see the log above)")
    return bytes(data)


__all__ = ["GraphEntry", "build_engines", "plan_profiles", "plugin_node_problems"]
