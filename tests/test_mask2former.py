"""Mask2Former: parity with `transformers`' implementation through the checkpoint key map, the detectron2
`.pkl` reader (and its refusal of foreign globals), named configs, and closed-vocabulary selection.

Our model follows the official code; in float32 `transformers` computes the same function (its sine
positions use arange instead of a cumsum of ones, its Swin backbone always partitions windows as the
official one does), so the parity test holds it to float rounding. Known differences outside this test:
the official pixel decoder casts its inputs to float32 before the deformable encoder (transformers
does not, which matters under fp16/bf16 only), and the transformers Swin carries an unused final
LayerNorm (`swin.layernorm`) that the key map drops."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig as HFMask2FormerConfig
from transformers import Mask2FormerForUniversalSegmentation
from transformers import SwinConfig as HFSwinConfig

from models.backbones.swin import SwinConfig, relative_position_index
from models.checkpoint import CheckpointError
from models.checkpoint_formats import (
    convert_hf_mask2former,
    load_any_checkpoint,
    read_detectron2_pkl,
    read_state_dict_any,
)
from models.configs import PixelDecoderConfig
from models.decoders.mask2former import HeadOutput, Mask2FormerDecoderConfig
from models.labels import ADE20K_SEMANTIC, COCO_PANOPTIC, select_class_logits
from models.mask2former import (
    Mask2FormerConfig,
    Mask2FormerModel,
    get_mask2former_config,
    mask2former_config_names,
)

TOL = 1e-4  # fp32 on CPU; both sides run the same math in a different order


def small_config() -> Mask2FormerConfig:
    """A small model of the real architecture (Swin window 7, 3 levels, masked attention)."""
    return Mask2FormerConfig(
        name="mask2former-small-test",
        backbone=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7),
        pixel_decoder=PixelDecoderConfig(
            name="transformer_encoder_deform",
            conv_dim=64,
            mask_dim=64,
            num_heads=4,
            dim_feedforward=128,
            num_encoder_layers=2,
            norm_groups=32,
            num_points=4,
            num_levels=3,
            level_order="coarse_first",
            fpn_upsample="bilinear",
        ),
        decoder=Mask2FormerDecoderConfig(
            num_classes=133,
            hidden_dim=64,
            num_heads=4,
            dim_feedforward=128,
            num_layers=3,
            num_queries=10,
            mask_dim=64,
            in_channels=64,
        ),
    )


def hf_small_model() -> Mask2FormerForUniversalSegmentation:
    """The same model in `transformers`, every parameter (norms and biases too) seeded random."""
    swin = HFSwinConfig(
        embed_dim=32,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = HFMask2FormerConfig(
        backbone_config=swin,
        feature_size=64,
        mask_feature_size=64,
        hidden_dim=64,
        encoder_feedforward_dim=128,
        encoder_layers=2,
        decoder_layers=4,  # the first prediction + 3 layers
        num_attention_heads=4,
        dim_feedforward=128,
        num_queries=10,
        num_labels=133,
    )
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / max(p.shape[-1], 1) ** 0.5)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Mask2FormerForUniversalSegmentation]:
    """A `save_pretrained` folder (model.safetensors + config.json) and the model that wrote it."""
    torch.manual_seed(0)
    model = hf_small_model()
    folder = tmp_path_factory.mktemp("hf_mask2former")
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder, model


@pytest.fixture(scope="module")
def ours(hf_checkpoint: tuple[Path, Mask2FormerForUniversalSegmentation]) -> Mask2FormerModel:
    model = Mask2FormerModel(small_config()).eval()
    load_any_checkpoint(model, hf_checkpoint[0])  # strict: every key present, none left over
    return model


# ------------------------------------------------------------------------------------ parity


def test_transformers_parity_on_a_real_sized_image(
    hf_checkpoint: tuple[Path, Mask2FormerForUniversalSegmentation], ours: Mask2FormerModel
) -> None:
    _, hf = hf_checkpoint
    images = torch.randn(2, 3, 384, 512, generator=torch.Generator().manual_seed(7))
    rounds: list[HeadOutput] = []
    with torch.no_grad():
        expected = hf(pixel_values=images)
        head = ours.forward_heads(images, record=rounds)
    logits, masks = head.logits, head.masks
    assert logits.shape == (2, 10, 134) and masks.shape == (2, 10, 96, 128)
    err_logits = (logits - expected.class_queries_logits).abs().max().item()
    err_masks = (masks - expected.masks_queries_logits).abs().max().item()
    scale = masks.abs().max().item()  # mask logits reach tens: compare relative to their range
    assert err_logits < TOL, err_logits
    assert err_masks < TOL * 0.1 * max(1.0, scale), (err_masks, scale)
    # The comparison means something: outputs vary, and masked attention blocked part of the pixels
    # (neither nothing nor everything) in the layers.
    assert logits.std() > 0.1 and masks.std() > 0.1
    blocked = [r.attn_mask.float().mean().item() for r in rounds[:-1]]
    assert len(rounds) == 4 and any(0.05 < b < 0.95 for b in blocked), blocked


def test_transformers_backbone_features_match(
    hf_checkpoint: tuple[Path, Mask2FormerForUniversalSegmentation], ours: Mask2FormerModel
) -> None:
    """res2..res5 of our Swin equal those of the transformers backbone on an input whose maps are no
    multiple of the window and, at 1/16 and 1/32, smaller than it: both pad to the window and keep
    the shifted windows (transformers' backbone always partitions, as the official code does)."""
    _, hf = hf_checkpoint
    images = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        theirs = hf.model.pixel_level_module.encoder(images).feature_maps
        mine = ours.backbone(images)
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        assert mine[name].shape == theirs[i].shape
        assert (mine[name] - theirs[i]).abs().max().item() < TOL, name


def test_key_map_reads_module_names_and_file_names_alike(
    hf_checkpoint: tuple[Path, Mask2FormerForUniversalSegmentation], ours: Mask2FormerModel
) -> None:
    """transformers writes legacy names to files (`attention.self.query`) and keeps others in memory
    (`swin.` ... `attention.q_proj`): both convert to the same official state dict, which is exactly
    our model's set of keys, with q/k/v joined in that order."""
    folder, hf = hf_checkpoint
    from_file = read_state_dict_any(folder)
    from_memory = convert_hf_mask2former(hf.state_dict())
    assert set(from_file) == set(from_memory) == set(ours.state_dict()) | {"criterion.empty_weight"}
    for key, value in from_file.items():
        assert torch.equal(value, from_memory[key]), key
    qkv = from_file["backbone.layers.0.blocks.0.attn.qkv.weight"]
    swin_attn = hf.model.pixel_level_module.encoder.swin.encoder.layers[0].blocks[0].attention
    assert torch.equal(qkv[32:64], swin_attn.k_proj.weight)
    in_proj = from_file["sem_seg_head.predictor.transformer_self_attention_layers.1.self_attn.in_proj_bias"]
    self_attn = hf.model.transformer_module.decoder.layers[1].self_attn
    assert torch.equal(in_proj[128:], self_attn.v_proj.bias)


def test_unknown_transformers_key_is_an_error(
    hf_checkpoint: tuple[Path, Mask2FormerForUniversalSegmentation],
) -> None:
    state = dict(hf_checkpoint[1].state_dict())
    state["model.transformer_module.decoder.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="extra_head"):
        convert_hf_mask2former(state)


def test_full_size_swin_t_layout_loads_strictly() -> None:
    """The transformers Swin-T COCO panoptic model (the layout of its released checkpoint) converts to
    exactly the keys and shapes of `mask2former-swint-coco-panoptic`."""
    swin = HFSwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    hf = Mask2FormerForUniversalSegmentation(HFMask2FormerConfig(backbone_config=swin, num_labels=133))
    model = Mask2FormerModel(get_mask2former_config("mask2former-swint-coco-panoptic"))
    state = convert_hf_mask2former(hf.state_dict())
    expected = model.state_dict()
    assert set(state) - {"criterion.empty_weight"} == set(expected)
    assert all(state[k].shape == v.shape for k, v in expected.items())
    # 47.4M parameters, the paper's "47M" for Swin-T
    assert sum(p.numel() for p in model.parameters()) == 47_435_264


# ------------------------------------------------------------------------------------ detectron2 .pkl


def detectron2_pickle(state: dict[str, torch.Tensor], protocol: int) -> bytes:
    """A model-zoo style file: numpy arrays under "model", bookkeeping next to it."""
    arrays = OrderedDict((k, v.numpy()) for k, v in state.items())
    return pickle.dumps(
        {"model": arrays, "__author__": "test", "matching_heuristics": True}, protocol=protocol
    )


@pytest.mark.parametrize("protocol", [2, 5])
def test_detectron2_pkl_loads_into_the_model(ours: Mask2FormerModel, tmp_path: Path, protocol: int) -> None:
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    # As saved from the official Swin: a relative position index buffer per block (checked, dropped).
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        state[key.replace("bias_table", "index")] = relative_position_index(7)
    path = tmp_path / "model_final.pkl"
    path.write_bytes(detectron2_pickle(state, protocol))
    fresh = Mask2FormerModel(small_config()).eval()
    load_any_checkpoint(fresh, path)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, masks = fresh(images)
        head = ours.forward_heads(images)
    assert masks.shape == (1, 10, 16, 24)
    assert torch.equal(logits, head.logits) and torch.equal(masks, head.masks)


def test_detectron2_pkl_written_by_numpy_1(tmp_path: Path) -> None:
    """numpy 1.x names its reconstruction function `numpy.core.multiarray._reconstruct`."""
    data = pickle.dumps({"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}, protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    state = read_detectron2_pkl(path)
    assert torch.equal(state["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious file does: call os.system when unpickled
        return (os.system, (f"touch {self.marker}",))


def test_pkl_referencing_os_system_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _RunsACommand(marker)}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refused global (posix|os|nt)\.system"):
        read_state_dict_any(path)
    assert not marker.exists()


def test_pkl_referencing_builtins_eval_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "eval.pkl"
    # protocol 0 by hand: builtins.eval("__import__('os')") as the "model" entry
    path.write_bytes(b"(dp0\nVmodel\np1\ncbuiltins\neval\np2\n(V__import__('os')\np3\ntp4\nRp5\ns.")
    with pytest.raises(CheckpointError, match=r"refused global builtins\.eval"):
        read_detectron2_pkl(path)


def test_pkl_with_a_wrong_relative_position_index_is_an_error(ours: Mask2FormerModel, tmp_path: Path) -> None:
    state = dict(ours.state_dict())
    key = "backbone.layers.0.blocks.0.attn.relative_position_index"
    state[key] = relative_position_index(7).flip(0)
    path = tmp_path / "bad.pkl"
    path.write_bytes(detectron2_pickle(state, 2))
    with pytest.raises(CheckpointError, match="relative_position_index"):
        read_state_dict_any(path)


# ------------------------------------------------------------------------------------ configs, vocabulary


def test_named_configs_match_their_label_sets() -> None:
    names = mask2former_config_names()
    assert "mask2former-swint-coco-panoptic" in names and "mask2former-swint-ade20k-semantic" in names
    for name in names:
        cfg = get_mask2former_config(name)
        assert cfg.decoder.num_classes == len(cfg.labels)
    swint = get_mask2former_config("mask2former-swint-coco-panoptic")
    assert (swint.decoder.num_queries, swint.decoder.num_layers, swint.backbone.embed_dim) == (100, 9, 96)
    assert get_mask2former_config("mask2former-swinl-coco-panoptic").decoder.num_queries == 200
    assert get_mask2former_config("mask2former-swint-ade20k-semantic").resize.short == 512
    with pytest.raises(KeyError, match="mask2former-swint-coco-panoptic"):
        get_mask2former_config("mask2former-unknown")


def test_label_sets() -> None:
    assert len(COCO_PANOPTIC) == 133 and sum(COCO_PANOPTIC.isthing) == 80
    assert COCO_PANOPTIC.names[0] == "person" and COCO_PANOPTIC.names[80] == "banner"
    assert COCO_PANOPTIC.names[-1] == "rug-merged" and not COCO_PANOPTIC.isthing[-1]
    assert len(ADE20K_SEMANTIC) == 150 and ADE20K_SEMANTIC.names[-1] == "flag"


def test_vocabulary_selects_by_name_and_alias() -> None:
    model_labels = COCO_PANOPTIC
    assert model_labels.select(["person", "Sky", " wall ", "tree-merged"]) == [0, 119, 131, 116]
    # a synonym selects its class; a full name wins over the same word as another class's synonym
    assert ADE20K_SEMANTIC.select(["road", "stool"]) == [6, 110]
    assert ADE20K_SEMANTIC.select(["Road, Route"]) == [6]
    with pytest.raises(ValueError, match="both name"):
        model_labels.select(["sky", "sky-other-merged"])


def test_unknown_vocabulary_names_the_valid_labels() -> None:
    with pytest.raises(ValueError) as err:
        COCO_PANOPTIC.select(["person", "unicorn", "dragon"])
    message = str(err.value)
    assert "'unicorn'" in message and "'dragon'" in message
    assert "valid labels: person, bicycle" in message and "rug-merged" in message
    with pytest.raises(ValueError, match="empty vocabulary"):
        ADE20K_SEMANTIC.select([])


def test_model_vocabulary_selection_keeps_full_vocabulary_probabilities(ours: Mask2FormerModel) -> None:
    indices = ours.select_vocabulary(["dog", "person", "grass"])
    assert indices == [16, 0, 125]
    logits = torch.randn(2, 10, 134, generator=torch.Generator().manual_seed(3))
    restricted = select_class_logits(logits, indices)
    assert restricted.shape == (2, 10, 4)
    full = logits.softmax(-1)
    part = restricted.softmax(-1)
    assert torch.allclose(part[..., :3], full[..., indices], atol=1e-6)
    # the last column carries no object plus every class not requested
    assert torch.allclose(part[..., 3], 1 - full[..., indices].sum(-1), atol=1e-6)
    with pytest.raises(ValueError, match="valid labels"):
        ours.select_vocabulary(["dragon"])


def test_config_copies_are_independent() -> None:
    a = get_mask2former_config("mask2former-swint-coco-panoptic")
    a.decoder.num_queries = 5
    assert get_mask2former_config("mask2former-swint-coco-panoptic").decoder.num_queries == 100


def test_predictor_serves_a_detectron2_pkl_checkpoint(tmp_path: Path) -> None:
    """`Predictor.from_config` with a `.pkl` checkpoint: the weights of the file are the ones used (a
    perturbed copy of the seeded miniature gives other logits; the file itself gives its own)."""
    from models.predictor import Predictor

    seeded = Predictor.from_config("mask2former-tiny-coco-panoptic")
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in seeded.model.state_dict().items()}
    path = tmp_path / "model_final.pkl"
    path.write_bytes(detectron2_pickle(state, 2))
    loaded = Predictor.from_config("mask2former-tiny-coco-panoptic", checkpoint=path)
    assert loaded.model_id != seeded.model_id
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    rows = loaded.encode_texts(["person", "sky"])
    segments = loaded.segment([image], [rows], "semantic")[0].segments
    assert segments and {s.label_index for s in segments} <= {0, 1}
