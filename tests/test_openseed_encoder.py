"""OpenSeeD Swin-T: the Swin backbone and the 4-level deformable pixel decoder against the golden arrays
of the official code (`openseed_swint/case_a`), on the deterministic reference checkpoint.

Bounds are the reference README's (section 6): backbone max abs 1e-3 and mean abs 1e-4; encoder and
pixel decoder max abs 2e-3 and mean abs 2e-4; level layouts exact. Arrays stored as a summary
(`NAME@idx` / `NAME@vals`) are compared at the stored indices, and their full-tensor mean and std
against the README's statistics within the mean-abs bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbones.swin import SwinConfig, SwinTransformer, relative_position_index
from models.checkpoint import read_state_dict, reference_checkpoint
from models.configs import PixelDecoderConfig
from models.openseed import openseed_pixel_decoder
from models.pixel_decoders.ms_deform import MSDeformAttnPixelDecoder

BACKBONE = "backbone."
PIXEL_DECODER = "sem_seg_head.pixel_decoder."
BACKBONE_BOUND = (1e-3, 1e-4)  # (max abs, mean abs)
ENCODER_BOUND = (2e-3, 2e-4)


@dataclass
class Run:
    """The golden case and what our modules computed on its input."""

    golden: dict[str, np.ndarray]
    meta: dict[str, dict]
    backbone: SwinTransformer
    pixel_decoder: MSDeformAttnPixelDecoder
    outputs: dict[str, torch.Tensor]


def select(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def run(reference_root: Path, cache_dir: Path) -> Run:
    folder = reference_root / "openseed_swint"
    state = read_state_dict(reference_checkpoint(folder / "keys.json", cache_dir))
    backbone = SwinTransformer(SwinConfig()).eval()
    pixel_decoder = MSDeformAttnPixelDecoder(openseed_pixel_decoder(), backbone.out_channels).eval()
    # strict: every checkpoint entry of both modules is used and none of their parameters is missing
    backbone.load_state_dict(select(state, BACKBONE), strict=True)
    pixel_decoder.load_state_dict(select(state, PIXEL_DECODER), strict=True)

    golden = dict(np.load(folder / "case_a" / "golden.npz"))
    meta = json.loads((folder / "case_a" / "golden.json").read_text())["arrays"]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, out, i=i: outputs.__setitem__(f"encoder.layer{i}_out", out)
        )
        for i, layer in enumerate(pixel_decoder.transformer.encoder.layers)
    ]
    with torch.no_grad():
        features = backbone(torch.from_numpy(golden["input.tensor"]))
        inputs = pixel_decoder.encoder_inputs(features)
        result = pixel_decoder.forward_features(features)
        legacy = pixel_decoder(features)
    for hook in hooks:
        hook.remove()
    outputs.update({f"backbone.{name}": f for name, f in features.items()})
    for i, (src, pos) in enumerate(zip(inputs.srcs, inputs.pos, strict=True)):
        outputs[f"encoder.input_src{i}"] = src
        outputs[f"encoder.pos{i}"] = pos
    for i, level in enumerate(result.multi_scale):
        outputs[f"pixel_decoder.multi_scale_{i}"] = level
    outputs["encoder.memory"] = result.memory
    outputs["encoder.spatial_shapes"] = result.spatial_shapes
    outputs["encoder.level_start_index"] = result.level_start_index
    outputs["pixel_decoder.mask_features"] = result.mask_features
    outputs["legacy.mask_features"] = legacy[0]
    outputs["legacy.first_level"] = legacy[1]
    return Run(golden, meta, backbone, pixel_decoder, outputs)


def errors(run: Run, name: str) -> tuple[float, float, float]:
    """(max abs, mean abs, statistics error) of our array against the golden one; the statistics
    error is |mean - ref mean| + |std - ref std| over the whole tensor for summarised arrays, else 0."""
    ours = run.outputs[name].double().numpy()
    assert list(ours.shape) == run.meta[name]["shape"], name
    if name in run.golden:
        diff = np.abs(ours - run.golden[name])
        return float(diff.max()), float(diff.mean()), 0.0
    indices, values = run.golden[f"{name}@idx"], run.golden[f"{name}@vals"]
    diff = np.abs(ours.reshape(-1)[indices] - values)
    stats = abs(ours.mean() - run.meta[name]["mean"]) + abs(ours.std() - run.meta[name]["std"])
    return float(diff.max()), float(diff.mean()), float(stats)


def assert_within(run: Run, names: list[str], bound: tuple[float, float]) -> None:
    report = {name: errors(run, name) for name in names}
    bad = {n: e for n, e in report.items() if e[0] > bound[0] or e[1] > bound[1] or e[2] > bound[1]}
    assert not bad, f"over the bounds {bound}: {bad}"


def test_checkpoint_keys_are_the_manifests(run: Run, reference_root: Path) -> None:
    """Our module trees carry exactly the manifest's parameters; the Swin index buffers it lists are
    rebuilt by the module (not saved) and equal the standard table."""
    entries = json.loads((reference_root / "openseed_swint" / "keys.json").read_text())["entries"]
    params = {e["key"] for e in entries if e["kind"] == "parameter"}
    buffers = {e["key"] for e in entries if e["kind"] == "buffer"}
    ours = {BACKBONE + k for k in run.backbone.state_dict()}
    ours |= {PIXEL_DECODER + k for k in run.pixel_decoder.state_dict()}
    assert ours == {k for k in params if k.startswith((BACKBONE, PIXEL_DECODER))}
    rebuilt = {BACKBONE + k for k, _ in run.backbone.named_buffers()}
    assert rebuilt == {k for k in buffers if k.startswith(BACKBONE)}
    index = relative_position_index(7)
    assert index.shape == (49, 49) and index.diagonal().eq(84).all() and index.max() == 168
    assert torch.equal(run.backbone.layers[3].blocks[1].attn.relative_position_index, index)


def test_backbone_matches_golden(run: Run) -> None:
    assert_within(run, [f"backbone.res{i}" for i in range(2, 6)], BACKBONE_BOUND)


def test_encoder_inputs_and_layout_match_golden(run: Run) -> None:
    for name in ("encoder.spatial_shapes", "encoder.level_start_index"):
        assert np.array_equal(run.outputs[name].numpy(), run.golden[name]), name
    assert run.golden["encoder.spatial_shapes"].tolist() == [[64, 64], [32, 32], [16, 16], [8, 8]]
    names = [f"encoder.{kind}{i}" for kind in ("input_src", "pos") for i in range(4)]
    assert_within(run, names, ENCODER_BOUND)


def test_encoder_layers_match_golden(run: Run) -> None:
    names = [f"encoder.layer{i}_out" for i in range(6)] + ["encoder.memory"]
    assert_within(run, names, ENCODER_BOUND)


def test_pixel_decoder_outputs_match_golden(run: Run) -> None:
    names = ["pixel_decoder.mask_features"] + [f"pixel_decoder.multi_scale_{i}" for i in range(4)]
    assert_within(run, names, ENCODER_BOUND)
    # the tuple form of forward (X-Decoder's call) returns the same tensors
    assert torch.equal(run.outputs["legacy.mask_features"], run.outputs["pixel_decoder.mask_features"])
    assert torch.equal(run.outputs["legacy.first_level"], run.outputs["pixel_decoder.multi_scale_0"])


def test_mask2former_level_construction() -> None:
    """Three levels, low resolution first: input_proj.0 reads res5, the FFN is 1024 wide, and the
    sampling offsets cover 3 levels."""
    cfg = PixelDecoderConfig(
        name="transformer_encoder_deform",
        conv_dim=256,
        mask_dim=256,
        dim_feedforward=1024,
        fpn_upsample="bilinear",
    )
    decoder = MSDeformAttnPixelDecoder(cfg, [96, 192, 384, 768])
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert shapes["input_proj.0.0.weight"] == (256, 768, 1, 1)
    assert shapes["input_proj.2.0.weight"] == (256, 192, 1, 1)
    assert "input_proj.3.0.weight" not in shapes
    assert shapes["transformer.level_embed"] == (3, 256)
    assert shapes["transformer.encoder.layers.0.linear1.weight"] == (1024, 256)
    assert shapes["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"] == (192, 256)
    features = {f"res{i + 2}": torch.randn(1, c, 64 >> i, 96 >> i) for i, c in enumerate([96, 192, 384, 768])}
    with torch.no_grad():
        out = decoder.forward_features(features)
    assert [tuple(m.shape[-2:]) for m in out.multi_scale] == [(8, 12), (16, 24), (32, 48)]
    assert out.mask_features.shape == (1, 256, 64, 96)
    assert out.memory.shape == (1, 8 * 12 + 16 * 24 + 32 * 48, 256)
    assert out.level_start_index.tolist() == [0, 96, 96 + 384]


def test_swin_pads_sizes_that_are_not_multiples() -> None:
    """Inputs off the patch and window grids run and give the rounded-up sizes; the stem pads with
    zeros at the bottom/right, so padding the image that way by hand changes nothing."""
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))).eval()
    image = torch.randn(1, 3, 99, 150)
    with torch.no_grad():
        features = model(image)
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "res2": (25, 38),
        "res3": (13, 19),
        "res4": (7, 10),
        "res5": (4, 5),
    }
    assert all(torch.isfinite(f).all() for f in features.values())
    with torch.no_grad():
        padded = model(torch.nn.functional.pad(image, (0, 2, 0, 1)))  # 100 x 152: same patch grid
    for name in features:
        assert torch.allclose(padded[name], features[name], atol=1e-5), name


def test_fine_first_levels_ignore_padding_with_a_valid_mask() -> None:
    """With the padding-aware merge, an image's pixel-decoder outputs (the stride-2 1/64 level
    included) are the same alone and zero-padded into a larger batch with a `valid` mask."""
    torch.manual_seed(0)
    cfg = PixelDecoderConfig(
        name="transformer_encoder_deform",
        conv_dim=32,
        mask_dim=16,
        num_heads=4,
        dim_feedforward=64,
        num_encoder_layers=2,
        norm_groups=8,
        num_levels=4,
        level_order="fine_first",
        fpn_upsample="nearest",
    )
    channels = [8, 16, 24, 32]
    decoder = MSDeformAttnPixelDecoder(cfg, channels).eval()
    with torch.no_grad():  # offsets that reach across the image border
        for layer in decoder.transformer.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.5)
    own = {f"res{i + 2}": torch.randn(1, c, 16 >> i, 24 >> i) for i, c in enumerate(channels)}
    padded = {
        name: torch.cat((torch.nn.functional.pad(f, (0, f.shape[-1] // 3, 0, f.shape[-2] // 2)),) * 2)
        for name, f in own.items()
    }
    for name, f in padded.items():  # the second image fills the batch's whole map, the first has junk
        h, w = own[name].shape[-2:]
        f[1].normal_()
        f[0, :, h:] = 10.0
        f[0, :, :, w:] = -10.0
    valid = torch.zeros(2, 1, 24, 32)
    valid[0, :, :16, :24] = 1
    valid[1] = 1
    with torch.no_grad():
        alone = decoder.forward_features(own)
        batched = decoder.forward_features(padded, valid)
    assert [tuple(m.shape[-2:]) for m in alone.multi_scale] == [(8, 12), (4, 6), (2, 3), (1, 2)]
    assert [tuple(m.shape[-2:]) for m in batched.multi_scale] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    for a, b in zip(alone.multi_scale, batched.multi_scale, strict=True):
        h, w = a.shape[-2:]
        assert torch.allclose(b[:1, :, :h, :w], a, atol=1e-4)
    assert torch.allclose(batched.mask_features[:1, :, :16, :24], alone.mask_features, atol=1e-4)
