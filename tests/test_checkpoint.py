"""Checkpoint loading: the reference checkpoint loads strictly, broken files fail naming their keys."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import (
    CheckpointError,
    file_sha256,
    fingerprint,
    load_checkpoint,
    quick_hash,
    read_state_dict,
    reference_checkpoint,
    reference_tensor,
)
from models.configs import get_config
from models.xdecoder import XDecoderModel

SELF_ATTN_MASK = "sem_seg_head.predictor.self_attn_mask"


@pytest.fixture(scope="module")
def demo_state() -> dict[str, torch.Tensor]:
    """A demo model's parameters as a released file would hold them (no buffers)."""
    torch.manual_seed(1)
    model = XDecoderModel(get_config("demo"))
    return {k: v.clone() for k, v in model.state_dict().items() if k != SELF_ATTN_MASK}


def fresh_demo() -> XDecoderModel:
    return XDecoderModel(get_config("demo"))


def test_demo_state_round_trip_pt_and_safetensors(tmp_path: Path, demo_state: dict) -> None:
    for path in (tmp_path / "demo.pt", tmp_path / "demo.safetensors"):
        if path.suffix == ".pt":
            torch.save(demo_state, path)
        else:
            save_file(demo_state, str(path))
        model = fresh_demo()
        load_checkpoint(model, path)
        loaded = model.state_dict()
        for key, value in demo_state.items():
            assert torch.equal(loaded[key], value), key


def test_tolerated_gaps_and_wrapper(tmp_path: Path, demo_state: dict) -> None:
    """Loss-only keys are ignored, the rebuildable mask may be absent, a {"model": ...} wrapper unwraps."""
    state = dict(demo_state)
    state["criterion.empty_weight"] = torch.ones(7)
    path = tmp_path / "wrapped.pt"
    torch.save({"model": state}, path)
    model = fresh_demo()
    mask_before = model.decoder.self_attn_mask.clone()
    load_checkpoint(model, path)
    assert torch.equal(model.decoder.self_attn_mask, mask_before)
    assert torch.equal(
        model.decoder.query_feat.weight, demo_state["sem_seg_head.predictor.query_feat.weight"]
    )


def test_missing_key_is_named(tmp_path: Path, demo_state: dict) -> None:
    state = dict(demo_state)
    del state["sem_seg_head.predictor.class_embed"]
    del state["backbone.norm3.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing keys") as err:
        load_checkpoint(fresh_demo(), tmp_path / "missing.pt")
    assert "sem_seg_head.predictor.class_embed" in str(err.value)
    assert "backbone.norm3.bias" in str(err.value)


def test_unexpected_key_is_named(tmp_path: Path, demo_state: dict) -> None:
    state = dict(demo_state)
    state["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: sem_seg_head.predictor.extra_head.weight"):
        load_checkpoint(fresh_demo(), tmp_path / "extra.pt")


def test_wrong_shape_is_named(tmp_path: Path, demo_state: dict) -> None:
    state = dict(demo_state)
    key = "sem_seg_head.predictor.query_feat.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="mis-shaped keys") as err:
        load_checkpoint(fresh_demo(), tmp_path / "shape.pt")
    assert key in str(err.value)
    assert str(tuple(state[key].shape)) in str(err.value)


class Payload:
    """An arbitrary object: the weights-only unpickler must refuse to build it."""

    def __reduce__(self) -> tuple:
        return (print, ("code ran",))


def test_pickle_with_objects_is_refused(
    tmp_path: Path, demo_state: dict, capsys: pytest.CaptureFixture
) -> None:
    state = dict(demo_state)
    state["payload"] = Payload()
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        read_state_dict(path)
    assert "code ran" not in capsys.readouterr().out


def test_non_tensor_entries_are_refused(tmp_path: Path, demo_state: dict) -> None:
    state = dict(demo_state)
    state["epoch"] = 3  # allowed by the weights-only unpickler, but not a tensor
    torch.save(state, tmp_path / "epoch.pt")
    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        read_state_dict(tmp_path / "epoch.pt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")


def test_hashes_change_with_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 2_999_999 + b"y")
    assert file_sha256(a) != file_sha256(b)
    assert quick_hash(a) != quick_hash(b)
    assert quick_hash(a) == quick_hash(a)


def test_reference_tensor_rule() -> None:
    assert float(reference_tensor("x.logit_scale", [])) == pytest.approx(2.65926)
    assert float(reference_tensor("x.other", [])) == 1.0
    bias = reference_tensor("a.bias", [1000])
    scale = reference_tensor("a.weight", [1000])
    matrix = reference_tensor("a.weight", [64, 4, 5])
    assert bias.abs().max() < 0.2 and abs(float(bias.std()) - 0.02) < 0.003
    assert abs(float(scale.mean()) - 1.0) < 0.02
    assert abs(float(matrix.std()) - 20**-0.5) < 0.02
    assert torch.equal(reference_tensor("a.weight", [64, 4, 5]), matrix)  # deterministic per key


@pytest.mark.slow
def test_reference_checkpoint_loads_strictly(reference_root: Path, cache_dir: Path) -> None:
    keys = reference_root / "xdecoder_focalt" / "keys.json"
    path = reference_checkpoint(keys, cache_dir)
    assert reference_checkpoint(keys, cache_dir) == path  # reused, not rewritten
    state = read_state_dict(path)
    assert len(state) == 724
    assert fingerprint(state) == pytest.approx(4911571.843800, abs=1e-3)  # the README's value
    model = XDecoderModel(get_config("xdecoder-focalt"))
    load_checkpoint(model, path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    mask = loaded[SELF_ATTN_MASK][0]
    assert mask.shape == (178, 178)
    assert mask[:101, 101:].all() and mask[:100, 100].all() and mask[100, :100].all()
    assert not mask[100, 100] and not mask[101:, :100].any()
    assert torch.equal(mask[101:, 101:], torch.ones(77, 77, dtype=torch.bool).triu(1))
