"""ONNX export of the demo model: `openset export onnx` and `openset export verify` on the real CLI,
both MSDA forms, the manifest, failure detection, and the exported model under the Predictor's
pre/postprocessing (every task equal to torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.manifest import MANIFEST, read_manifest
from export.onnx_graphs import export_onnx_model
from export.runtime import load_exported
from export.tensorrt_build import plan_profiles, plugin_node_problems
from models.checkpoint import file_sha256
from models.configs import get_config
from models.language.tokenizer import EOS_ID
from models.ops.onnx_export import PLUGIN_DOMAIN, PLUGIN_NAME
from models.predictor import Predictor, build_model
from models.preprocess import padded_size
from service.cli import main

GRAPHS = {
    "image_encoder",
    "segment_decoder",
    "grounding_decoder",
    "caption_state",
    "caption_step",
    "text_encoder",
}
FORMS = {"plugin": ["--dynamic"], "portable": ["--size", "160x160", "--size", "96x128"]}


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model exported by the CLI in both MSDA forms (plugin: dynamic; portable: two sizes)."""
    out = {}
    for form, flags in FORMS.items():
        directory = tmp_path_factory.mktemp(f"demo-{form}")
        assert (
            main(["export", "onnx", "--model", "demo", "--out", str(directory), "--msda", form, *flags]) == 0
        )
        out[form] = directory
    return out


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(FORMS))
def test_cli_verify_passes_on_both_forms(
    demo_exports: dict[str, Path], form: str, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["export", "verify", str(demo_exports[form])]) == 0
    lines = capsys.readouterr().out.splitlines()
    checks = [line for line in lines if line.endswith(("PASS", "FAIL"))]
    assert checks and all(line.endswith("PASS") for line in checks)
    # every graph and every output of it was compared, at two sizes
    assert {line.split(":")[0] for line in checks} == GRAPHS
    assert len({line.split("@")[1].split()[0] for line in checks if "@" in line}) == 2
    assert lines[-1] == f"{len(checks)} of {len(checks)} checks passed"


@pytest.mark.slow
def test_manifest_identity_sizes_and_checksums(demo_exports: dict[str, Path]) -> None:
    model, weights_id = build_model("demo", None)
    for form, directory in demo_exports.items():
        manifest = read_manifest(directory)
        assert (manifest.kind, manifest.model, manifest.weights_id) == ("onnx", "demo", weights_id)
        assert manifest.msda == form and manifest.opset == 18
        assert manifest.config["decoder"]["num_queries"] == get_config("demo").decoder.num_queries
        assert manifest.logit_scale == pytest.approx(model.text_encoder.logit_scale.item())
        for entry in manifest.graphs:
            assert file_sha256(directory / entry.file) == entry.sha256
            graph = onnx.load(str(directory / entry.file), load_external_data=False)
            assert [i.name for i in graph.graph.input] == entry.inputs
            assert [o.name for o in graph.graph.output] == entry.outputs
    dynamic = read_manifest(demo_exports["plugin"])
    assert dynamic.dynamic and {e.name for e in dynamic.graphs} == GRAPHS
    images = onnx.load(str(demo_exports["plugin"] / "image_encoder.onnx"), load_external_data=False)
    dims = [d.dim_param for d in images.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    fixed = read_manifest(demo_exports["portable"])
    assert not fixed.dynamic and fixed.input_sizes == [[160, 160], [96, 128]]
    assert {tuple(e.size) for e in fixed.graphs if e.size} == {(160, 160), (96, 128)}
    with pytest.raises(KeyError, match="export with --dynamic"):
        fixed.graph("image_encoder", (192, 192))


@pytest.mark.slow
def test_deformable_attention_takes_the_chosen_form(demo_exports: dict[str, Path]) -> None:
    """The demo's MSDA pixel decoder: TensorRT plugin nodes, or GridSample ops only (3 levels each)."""
    layers = get_config("demo").pixel_decoder.num_encoder_layers
    for form, file, expected in (
        ("plugin", "image_encoder.onnx", (layers, 0)),
        ("portable", "image_encoder_160x160.onnx", (0, 3 * layers)),
    ):
        nodes = onnx.load(str(demo_exports[form] / file)).graph.node
        counts = (sum(n.op_type == PLUGIN_NAME for n in nodes), sum(n.op_type == "GridSample" for n in nodes))
        assert counts == expected, form
    with pytest.raises(ValueError, match="fixed sizes"):
        export_onnx_model("demo", None, demo_exports["plugin"] / "unused", msda="portable", dynamic=True)


@pytest.mark.slow
def test_verify_and_loading_detect_broken_exports(
    demo_exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = demo_exports["plugin"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in source.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    # A changed file is refused by its checksum.
    path = broken / "segment_decoder.onnx"
    graph = onnx.load(str(path))
    weight = next(t for t in graph.graph.initializer if len(t.dims) == 2)
    values = onnx.numpy_helper.to_array(weight) * 1.01
    weight.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), weight.name))
    onnx.save(graph, str(path))
    with pytest.raises(ValueError, match="sha256"):
        read_manifest(broken)
    # With the checksum updated, verify finds the numerical difference and fails.
    manifest = json.loads((broken / MANIFEST).read_text())
    for entry in manifest["graphs"]:
        if entry["file"] == path.name:
            entry["sha256"] = file_sha256(path)
    (broken / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["export", "verify", str(broken), "--size", "96x128"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")]
    assert failed and all(line.startswith("segment_decoder:") for line in failed)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(200, 300), (160, 160), (150, 400)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.slow
def test_exported_model_runs_every_task_like_torch(demo_exports: dict[str, Path]) -> None:
    """The Predictor on the exported graphs: a batch of three sizes, every task, the same outputs."""
    torch_predictor = Predictor.from_config("demo")
    exported = load_exported(demo_exports["plugin"], "onnxruntime")
    onnx_predictor = Predictor(exported, "demo", exported.manifest.weights_id, "cpu", "onnxruntime")
    images = _images()
    names = ["cat", "dog", "tree", "sky"]
    texts = torch_predictor.encode_texts(names)
    assert torch.allclose(onnx_predictor.encode_texts(names), texts, atol=1e-5)
    vocabularies = [texts, texts[:2], texts[1:]]
    for task in ("semantic", "panoptic", "instance"):
        expected = torch_predictor.segment(
            images, vocabularies, task, threshold=0.0 if task == "panoptic" else None
        )
        actual = onnx_predictor.segment(
            images, vocabularies, task, threshold=0.0 if task == "panoptic" else None
        )
        for want, got in zip(expected, actual, strict=True):
            assert got.image_size == want.image_size
            assert [s.label_index for s in got.segments] == [s.label_index for s in want.segments]
            assert np.allclose([s.score for s in got.segments], [s.score for s in want.segments], atol=1e-4)
            differing = sum(
                int((a.mask != b.mask).sum()) for a, b in zip(got.segments, want.segments, strict=True)
            )
            total = sum(a.mask.size for a in want.segments)
            assert differing <= 1e-3 * max(total, 1)
    phrases = ["the red circle", "a tree", "blue square on the left"]
    for want, got in zip(
        torch_predictor.refer(images, phrases, multi=True, threshold=0.0),
        onnx_predictor.refer(images, phrases, multi=True, threshold=0.0),
        strict=True,
    ):
        assert len(got.matches) == len(want.matches) > 0
        assert np.allclose([m.score for m in got.matches], [m.score for m in want.matches], atol=1e-4)
    # Tokens agree up to each row's first end-of-text. After it, a row keeps decoding while another
    # row of its batch has not ended, and the runtime batches by padded size, torch the whole batch.
    ours, theirs = onnx_predictor.caption_tokens(images), torch_predictor.caption_tokens(images)
    for mine, want in zip(ours, theirs, strict=True):
        ends = (want == EOS_ID).nonzero()
        length = int(ends[0]) + 1 if len(ends) else len(want)
        assert torch.equal(mine[:length], want[:length])
    assert onnx_predictor.caption(images) == torch_predictor.caption(images)
    retrieval = ["a cat", "two dogs"]
    assert torch.allclose(
        onnx_predictor.retrieve(images, retrieval), torch_predictor.retrieve(images, retrieval), atol=1e-5
    )
    assert torch.allclose(
        onnx_predictor.embed_images(images), torch_predictor.embed_images(images), atol=1e-5
    )
    assert torch.allclose(
        onnx_predictor.embed_texts(retrieval), torch_predictor.embed_texts(retrieval), atol=1e-5
    )


@pytest.mark.slow
def test_padded_batch_runs_per_size_group_like_torch(demo_exports: dict[str, Path]) -> None:
    """Images of different padded sizes in one batch: each size group runs alone, and the outputs in
    batch layout equal torch's padded-batch pass in each image's own area."""
    model, _ = build_model("demo", None)
    exported = load_exported(demo_exports["plugin"], "onnxruntime")
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 3, 160, 160, generator=gen)
    sizes = [(160, 160), (96, 128), (160, 160)]
    batch[1, :, 96:] = 0
    batch[1, :, :, 128:] = 0
    with torch.no_grad():
        features = model.encode_images(batch, sizes)
        head, _ = model.decoder.forward_seg(features.memory)
        backbone = model.backbone_embedding(features)
    ours = exported.encode_images(batch, sizes)
    assert [g.indices for g in ours.groups] == [[0, 2], [1]]
    our_head, _ = exported.decoder.forward_seg(ours.memory)
    assert torch.allclose(our_head.embeds, head.embeds, atol=1e-4)
    assert torch.allclose(exported.backbone_embedding(ours), backbone, atol=1e-4)
    for i, (h, w) in enumerate(sizes):
        own = (slice(None), slice(0, h // 4), slice(0, w // 4))
        assert torch.allclose(our_head.masks[i][own], head.masks[i][own], atol=1e-3)
    assert not our_head.masks[1, :, 24:].any()


@pytest.mark.slow
def test_tensorrt_plan_and_plugin_node_contract(demo_exports: dict[str, Path]) -> None:
    """Without TensorRT: the engine plan of a real export (profiles per graph, feature axes derived
    from the image axes) and the plugin node contract, which catches a node fed int64 indices."""
    plan = plan_profiles(demo_exports["plugin"], max_batch_size=4)
    assert set(plan) == {f"{g}.onnx" for g in GRAPHS}
    for profile in plan["image_encoder.onnx"] + plan["segment_decoder.onnx"]:
        shapes = profile["images"] if "images" in profile else profile["mask_features"]
        for low, opt, high in zip(*shapes, strict=True):
            assert low <= opt <= high
    caption = plan["caption_state.onnx"]
    assert len(caption) == 3  # one per shape class (wide, square, tall): the scale rule keeps the aspect
    rule = get_config("demo").resize["captioning"]
    big = padded_size(rule.max_size, rule.max_size)[0]
    largest = max(caption, key=lambda p: p["mask_features"][2][2] * p["mask_features"][2][3])
    assert largest["mask_features"][2] == [4, 64, big // 4, big // 4]
    assert largest["ms0"][2] == [4, 64, big // 32, big // 32]
    only_segmentation = plan_profiles(demo_exports["plugin"], tasks=["segmentation"])
    assert set(only_segmentation) == {"image_encoder.onnx", "segment_decoder.onnx", "text_encoder.onnx"}

    graph = onnx.load(str(demo_exports["plugin"] / "image_encoder.onnx"))
    assert plugin_node_problems(graph) == []
    node = next(n for n in graph.graph.node if n.op_type == PLUGIN_NAME)
    assert node.domain == PLUGIN_DOMAIN
    cast = next(n for n in graph.graph.node if n.output[0] == node.input[1])
    assert cast.op_type == "Cast"
    node.input[1] = cast.input[0]  # feed the int64 spatial shapes directly
    problems = plugin_node_problems(graph)
    assert len(problems) == 1 and "spatial_shapes is INT64" in problems[0]
