"""ONNX export of OpenSeeD and Mask2Former (`export.families`) on small seeded configs: both MSDA
forms run in ONNX Runtime (the plugin form through onnxruntime-extensions) against torch, the
OpenSeeD top-k selection inside the graph, the manifest, and `openset export verify` on the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.families import FAMILIES, OPENSEED_LEVELS, family_of, model_from_manifest, openseed_inputs
from export.manifest import read_manifest
from export.onnx_graphs import export_model
from export.runtime import load_exported
from export.verify import ATOL, RTOL, compare_openseed_decoder, verify_export
from models.backbones.swin import SwinConfig
from models.checkpoint import file_sha256, quick_hash
from models.mask2former import Mask2FormerConfig, Mask2FormerModel, get_mask2former_config
from models.openseed import OpenSeeDConfig, OpenSeeDModel, get_openseed_config
from models.ops.onnx_export import PLUGIN_NAME
from models.ops.ort_plugin import ort_session
from service.cli import main

SIZE = (128, 160)
FORMS = ("plugin", "portable")
TINY_SWIN = SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7)


def tiny_openseed_config() -> OpenSeeDConfig:
    """`openseed-swint` shrunk: Swin 32 (1,1,2,1), encoder 64 x 2 layers, decoder 64, 20 queries x 2
    layers, text 64 x 2 layers (context length 18 and the 512-d class space kept)."""
    cfg = get_openseed_config("openseed-swint")
    cfg.name = "openseed-tiny-test"
    cfg.backbone = dataclasses.replace(TINY_SWIN)
    cfg.pixel_decoder = dataclasses.replace(
        cfg.pixel_decoder, conv_dim=64, mask_dim=64, dim_feedforward=128, num_encoder_layers=2
    )
    cfg.decoder = dataclasses.replace(
        cfg.decoder, hidden_dim=64, num_queries=20, num_layers=2, dim_feedforward=128, mask_dim=64
    )
    cfg.text = dataclasses.replace(cfg.text, width=64, layers=2, heads=2)
    return cfg


def tiny_mask2former_config() -> Mask2FormerConfig:
    """`mask2former-swint-coco-panoptic` shrunk the same way: decoder 64, 20 queries x 3 layers."""
    cfg = get_mask2former_config("mask2former-swint-coco-panoptic")
    cfg.name = "mask2former-tiny-test"
    cfg.backbone = dataclasses.replace(TINY_SWIN)
    cfg.pixel_decoder = dataclasses.replace(
        cfg.pixel_decoder, conv_dim=64, mask_dim=64, dim_feedforward=128, num_encoder_layers=2
    )
    cfg.decoder = dataclasses.replace(
        cfg.decoder,
        hidden_dim=64,
        num_queries=20,
        num_layers=3,
        dim_feedforward=128,
        mask_dim=64,
        in_channels=64,
    )
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Torch on one thread in this module (the exports are small; threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def export_both_forms(family: str, model: torch.nn.Module, root: Path) -> dict[str, Path]:
    """Save the model's weights and export it in both MSDA forms at `SIZE`."""
    checkpoint = root / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    out = {}
    for form in FORMS:
        out[form] = root / form
        export_model(
            model,
            quick_hash(checkpoint)[:12],
            out[form],
            msda=form,
            dynamic=False,
            sizes=[SIZE],
            extra={"checkpoint": str(checkpoint)},
            graphs=FAMILIES[family].graphs,
        )
    return out


@pytest.fixture(scope="module")
def openseed(tmp_path_factory: pytest.TempPathFactory) -> tuple[OpenSeeDModel, dict[str, Path]]:
    torch.manual_seed(0)
    model = OpenSeeDModel(tiny_openseed_config()).eval()
    return model, export_both_forms("openseed", model, tmp_path_factory.mktemp("openseed"))


@pytest.fixture(scope="module")
def mask2former(tmp_path_factory: pytest.TempPathFactory) -> tuple[Mask2FormerModel, dict[str, Path]]:
    torch.manual_seed(0)
    model = Mask2FormerModel(tiny_mask2former_config()).eval()
    return model, export_both_forms("mask2former", model, tmp_path_factory.mktemp("mask2former"))


def run_graph(path: Path, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})
    return dict(zip(names, values, strict=True))


def assert_close(name: str, got: np.ndarray, ref: torch.Tensor | np.ndarray) -> None:
    ref = np.asarray(ref)
    assert got.shape == ref.shape, name
    err, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    assert err <= ATOL + RTOL * scale, f"{name}: max abs {err:.3e} (max|ref| {scale:.3e})"


def msda_nodes(path: Path) -> tuple[int, int]:
    nodes = onnx.load(str(path)).graph.node
    return sum(n.op_type == PLUGIN_NAME for n in nodes), sum(n.op_type == "GridSample" for n in nodes)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_openseed_graphs_match_torch(openseed: tuple[OpenSeeDModel, dict[str, Path]], form: str) -> None:
    """Other inputs than the traced ones (batch 1, 11 classes): errors within tolerance, the same
    top-k proposals; per-query outputs compared after matching queries by their proposal."""
    model, exports = openseed
    directory = exports[form]
    inputs = openseed_inputs(model, SIZE, seed=5)
    images = inputs["image_encoder"]["images"][:1]
    classes = torch.nn.functional.normalize(
        torch.randn(11, 512, generator=torch.Generator().manual_seed(6)), dim=-1
    )
    with torch.no_grad():
        ref = model(images, classes)
        record: dict[str, torch.Tensor] = {}
        features = FAMILIES["openseed"].graphs.specs(model, False)[0].module(images)
    encoded = run_graph(directory / "image_encoder_128x160.onnx", {"images": images})
    for name, value in zip(["mask_features", *OPENSEED_LEVELS], features, strict=True):
        assert_close(name, encoded[name], value)
    feeds = {name: torch.from_numpy(value) for name, value in encoded.items()}
    decoded = run_graph(directory / "openseed_decoder_128x160.onnx", {**feeds, "class_embeddings": classes})
    with torch.no_grad():
        levels = [features[1 + i] for i in range(len(OPENSEED_LEVELS))]
        model.decoder(levels, features[0], classes, masks=False, record=record)
    selected = record["decoder.topk_proposals"][0].numpy()
    got = decoded["topk_indices"][0]
    assert sorted(got.tolist()) == sorted(selected.tolist())
    order = [int(np.flatnonzero(got == p)[0]) for p in selected]  # ONNX row of each torch query
    assert decoded["pred_logits"].shape == (1, 20, 11)
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        assert_close(name, decoded[name][:, order], ref[name])
    ids = inputs["text_encoder"]["input_ids"]
    assert ids.shape[1] == 18
    text = run_graph(directory / "text_encoder.onnx", {"input_ids": ids})
    with torch.no_grad():
        assert_close("eos_features", text["eos_features"], model.text_encoder.eos_features(ids))
    # The chosen MSDA form: 2 encoder + 2 decoder layers, GridSample once per level (4) in each.
    counts = [msda_nodes(directory / f"{g}_128x160.onnx") for g in ("image_encoder", "openseed_decoder")]
    assert counts == ([(2, 0), (2, 0)] if form == "plugin" else [(0, 8), (0, 8)])


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_mask2former_graph_matches_torch(
    mask2former: tuple[Mask2FormerModel, dict[str, Path]], form: str
) -> None:
    model, exports = mask2former
    images = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(7))
    out = run_graph(exports[form] / "mask2former_128x160.onnx", {"images": images})
    with torch.no_grad():
        logits, masks = model(images)
    assert out["class_logits"].shape == (1, 20, 134)
    assert_close("class_logits", out["class_logits"], logits)
    assert_close("mask_logits", out["mask_logits"], masks)
    assert msda_nodes(exports[form] / "mask2former_128x160.onnx") == ((2, 0) if form == "plugin" else (0, 6))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["openseed", "mask2former"])
@pytest.mark.parametrize("form", FORMS)
def test_cli_verify_passes(
    request: pytest.FixtureRequest, family: str, form: str, capsys: pytest.CaptureFixture
) -> None:
    model, exports = request.getfixturevalue(family)
    capsys.readouterr()
    assert main(["export", "verify", str(exports[form])]) == 0
    lines = capsys.readouterr().out.splitlines()
    checks = [line for line in lines if line.endswith(("PASS", "FAIL"))]
    assert checks and all(line.endswith("PASS") for line in checks)
    expected = {
        "openseed": {
            "image_encoder": 5,
            "openseed_decoder": 4,  # topk_indices, pred_logits, pred_boxes, pred_masks
            "text_encoder": 1,
        },
        "mask2former": {"mask2former": 2},
    }[family]
    graphs = [line.split(":")[0] for line in checks]
    assert {g: graphs.count(g) for g in set(graphs)} == expected
    assert lines[-1] == f"{len(checks)} of {len(checks)} checks passed"


@pytest.mark.slow
def test_manifest_records_the_family_and_rebuilds_the_model(
    openseed: tuple[OpenSeeDModel, dict[str, Path]], mask2former: tuple[Mask2FormerModel, dict[str, Path]]
) -> None:
    for family, (model, exports) in (("openseed", openseed), ("mask2former", mask2former)):
        for form, directory in exports.items():
            manifest = read_manifest(directory)
            assert (manifest.family, manifest.msda, manifest.dynamic) == (family, form, False)
            assert manifest.input_sizes == [list(SIZE)] and manifest.model == model.cfg.name
            for entry in manifest.graphs:
                assert file_sha256(directory / entry.file) == entry.sha256
                graph = onnx.load(str(directory / entry.file), load_external_data=False)
                assert [i.name for i in graph.graph.input] == entry.inputs
                assert [o.name for o in graph.graph.output] == entry.outputs
            rebuilt, weights_id = model_from_manifest(manifest, manifest.extra["checkpoint"])
            assert weights_id == manifest.weights_id and rebuilt.cfg == model.cfg
    names = {e.name: e for e in read_manifest(openseed[1]["plugin"]).graphs}
    assert set(names) == {"image_encoder", "openseed_decoder", "text_encoder"}
    assert names["text_encoder"].size is None and names["image_encoder"].size == list(SIZE)
    text = onnx.load(str(openseed[1]["plugin"] / "text_encoder.onnx")).graph.input[0]
    assert [d.dim_param or d.dim_value for d in text.type.tensor_type.shape.dim] == ["texts", 18]
    # The serving runtimes refuse it; verify names the missing size.
    with pytest.raises(ValueError, match="X-Decoder exports only"):
        load_exported(openseed[1]["plugin"])
    with pytest.raises(KeyError, match="export again and add the size"):
        verify_export(openseed[1]["plugin"], sizes=[(96, 96)])


@pytest.mark.slow
def test_verify_aligns_reordered_queries_and_fails_a_different_selection(
    openseed: tuple[OpenSeeDModel, dict[str, Path]],
) -> None:
    """The alignment of `verify`: a permuted query order passes, a proposal far from the k-th score
    in the selection fails (torch outputs stand for ONNX Runtime's here)."""
    model, _ = openseed
    feeds = openseed_inputs(model, SIZE, seed=2)["openseed_decoder"]
    module = FAMILIES["openseed"].graphs.specs(model, False)[1].module
    with torch.no_grad():
        outputs = module(*feeds.values())
    names = ["pred_logits", "pred_boxes", "pred_masks", "topk_indices"]
    refs = {name: output.numpy() for name, output in zip(names, outputs, strict=True)}
    perm = np.random.default_rng(0).permutation(refs["topk_indices"].shape[1])
    permuted = {name: value[:, perm] for name, value in refs.items()}
    checks = compare_openseed_decoder(model, feeds, refs, permuted, "")
    assert all(c.ok for c in checks) and max(c.max_abs for c in checks) == 0.0
    assert checks[0].name == "openseed_decoder:topk_indices" and "reordered" in checks[0].note
    # The lowest-scoring proposal in place of the last selected one: not a near-tie.
    record: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        levels = [feeds[name] for name in OPENSEED_LEVELS]
        model.decoder(levels, feeds["mask_features"], feeds["class_embeddings"], False, record)
    worst = int(record["decoder.enc_class_logits"][0].max(dim=-1)[0].argmin())
    changed = {name: value.copy() for name, value in refs.items()}
    changed["topk_indices"][0, -1] = worst
    checks = compare_openseed_decoder(model, feeds, refs, changed, "")
    assert not checks[0].ok and checks[0].max_abs == 1.0


def test_family_names_and_refusals(tmp_path: Path) -> None:
    assert family_of("openseed-swint") == "openseed"
    assert family_of("mask2former-swinl-coco-panoptic") == "mask2former"
    assert family_of("demo") == "xdecoder"
    with pytest.raises(ValueError, match="needs a checkpoint"):
        main(["export", "onnx", "--model", "openseed-swint", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="fixed image sizes"):
        main(
            [
                "export",
                "onnx",
                "--model",
                "mask2former-swint-ade20k-semantic",
                "--out",
                str(tmp_path),
                "--dynamic",
            ]
        )


@pytest.mark.slow
def test_verify_refuses_other_weights(
    openseed: tuple[OpenSeeDModel, dict[str, Path]], tmp_path: Path
) -> None:
    model, exports = openseed
    other = tmp_path / "other.pt"
    state = model.state_dict()
    state["sem_seg_head.predictor.class_embed"] = state["sem_seg_head.predictor.class_embed"] * 1.01
    torch.save(state, other)
    with pytest.raises(ValueError, match="made from weights"):
        verify_export(exports["plugin"], checkpoint=other)
