"""Checkpoint layouts other than a flat torch state dict, turned into one with the official detectron2
key names (what `models.checkpoint.check_state_dict` then checks strictly):

- detectron2 `.pkl` (the Mask2Former model zoo): a pickled dict whose `"model"` entry maps names to
  numpy arrays, next to bookkeeping entries such as `"__author__"` and `"matching_heuristics"`. It is
  read with `RestrictedUnpickler`, which rebuilds numpy arrays and nothing else: any other global
  named by the file is refused before anything runs.
- Hugging Face `transformers` Mask2Former (`Mask2FormerForUniversalSegmentation`, `model.safetensors`
  or a `save_pretrained` folder): `model.pixel_level_module.encoder.*` -> `backbone.*`,
  `model.pixel_level_module.decoder.*` -> `sem_seg_head.pixel_decoder.*`,
  `model.transformer_module.*` and `class_predictor.*` -> `sem_seg_head.predictor.*`. Swin's separate
  query/key/value and the decoder self-attention's q/k/v projections are joined into the packed
  `qkv` / `in_proj_*` tensors of the official modules. Both the names `transformers` writes to files
  (`attention.self.query`, `intermediate.dense`, ...) and those of its in-memory modules
  (`attention.q_proj`, `mlp.fc1`, under `swin.`) are understood.

`read_state_dict_any(path)` picks the reader by suffix (`.pkl`; `.safetensors` or a folder, converted
when it holds the `transformers` layout; anything else goes to `models.checkpoint.read_state_dict`).
"""

from __future__ import annotations

import _codecs
import collections
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from models.checkpoint import CheckpointError, check_state_dict, read_state_dict

# ------------------------------------------------------------------------------------ detectron2 .pkl

# The only globals a pickle of numpy arrays needs. numpy 1.x writes `numpy.core.*`, numpy 2.x
# `numpy._core.*`; both names resolve to the functions of the numpy installed here. `_frombuffer` is
# how arrays are pickled with protocol 5, `_codecs.encode` how protocol 2 stores the raw bytes.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable | type] = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Callable | type:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a weights file may only reference numpy array "
                "reconstruction (numpy arrays, dtypes, OrderedDict)"
            )
        return allowed


def read_detectron2_pkl(path: str | Path) -> dict[str, torch.Tensor]:
    """The `"model"` entry of a detectron2 `.pkl` (or the whole dict when it has no such entry) as
    tensors of the stored dtypes; bookkeeping entries are dropped. Raises `CheckpointError` on refused
    or non-array content."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a detectron2 weights pickle ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, np.ndarray | np.generic)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not arrays: {', '.join(bad[:20])}")
    return {str(k): torch.from_numpy(np.array(v)) for k, v in obj.items()}


# ------------------------------------------------------------------------------------ transformers

HF_BACKBONE = "model.pixel_level_module.encoder."
HF_PIXEL_DECODER = "model.pixel_level_module.decoder."
HF_TRANSFORMER = "model.transformer_module."

# In-memory module names of recent transformers -> the names it writes to files.
_HF_MODULE_NAMES = [
    (r"^swin\.", ""),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.attention\.relative_position_bias\.", ".attention.self."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]

_BLOCK = r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_SWIN_RULES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (_BLOCK + r"layernorm_before\.", r"layers.\1.blocks.\2.norm1."),
    (_BLOCK + r"layernorm_after\.", r"layers.\1.blocks.\2.norm2."),
    (_BLOCK + r"attention\.self\.(relative_position_bias_table)$", r"layers.\1.blocks.\2.attn.\3"),
    (_BLOCK + r"attention\.self\.(query|key|value)\.(weight|bias)$", r"layers.\1.blocks.\2.attn.qkv.\4<\3>"),
    (_BLOCK + r"attention\.output\.dense\.", r"layers.\1.blocks.\2.attn.proj."),
    (_BLOCK + r"intermediate\.dense\.", r"layers.\1.blocks.\2.mlp.fc1."),
    (_BLOCK + r"output\.dense\.", r"layers.\1.blocks.\2.mlp.fc2."),
    (r"^encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.", r"layers.\1.downsample.\2."),
]  # fmt: skip

_PIXEL_DECODER_RULES = [
    (r"^input_projections\.(\d+)\.([01])\.", r"input_proj.\1.\2."),
    (r"^level_embed$", "transformer.level_embed"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"^mask_projection\.", "mask_features."),
    (r"^(adapter|layer)_(\d+)\.0\.weight$", r"\1_\2.weight"),
    (r"^(adapter|layer)_(\d+)\.1\.", r"\1_\2.norm."),
]

_LAYER = r"^decoder\.layers\.(\d+)\."
_SELF = r"transformer_self_attention_layers.\1."
_TRANSFORMER_RULES = [
    (r"^queries_embedder\.", "query_embed."),
    (r"^queries_features\.", "query_feat."),
    (r"^level_embed\.", "level_embed."),
    (r"^input_projections\.(\d+)\.", r"input_proj.\1."),
    (_LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)$", _SELF + r"self_attn.in_proj_\3<\2>"),
    (_LAYER + r"self_attn\.out_proj\.", _SELF + "self_attn.out_proj."),
    (_LAYER + r"self_attn_layer_norm\.", _SELF + "norm."),
    (_LAYER + r"cross_attn\.", r"transformer_cross_attention_layers.\1.multihead_attn."),
    (_LAYER + r"cross_attn_layer_norm\.", r"transformer_cross_attention_layers.\1.norm."),
    (_LAYER + r"fc1\.", r"transformer_ffn_layers.\1.linear1."),
    (_LAYER + r"fc2\.", r"transformer_ffn_layers.\1.linear2."),
    (_LAYER + r"final_layer_norm\.", r"transformer_ffn_layers.\1.norm."),
    (r"^decoder\.layernorm\.", "decoder_norm."),
    (r"^decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.", r"mask_embed.layers.\1."),
]  # fmt: skip

# Parts joined along dim 0 into one official tensor, in this order.
_JOIN_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}
_PART = re.compile(r"<(query|key|value|q|k|v)>")


def is_hf_mask2former(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has the `transformers` Mask2Former layout."""
    return any(k.startswith(("model.pixel_level_module.", "model.transformer_module.")) for k in state)


def _rename(name: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


DROP = ""  # the official name of a key that has no counterpart in the official model


def _backbone_name(rest: str) -> str:
    """A transformers Swin backbone key (after `model.pixel_level_module.encoder.`) -> official name
    below `backbone.`, DROP for keys the backbone does not use."""
    for pattern, repl in _HF_MODULE_NAMES:
        rest = re.sub(pattern, repl, rest)
    if rest.startswith("layernorm.") or rest.endswith("relative_position_index"):
        # the final norm of the classification model (unused by the backbone); a rebuilt buffer
        return DROP
    stage = re.match(r"^hidden_states_norms\.stage(\d+)\.(.+)$", rest)
    if stage:
        return f"norm{int(stage.group(1)) - 1}.{stage.group(2)}"
    return _rename(rest, _SWIN_RULES) or "?"


def _official_name(key: str) -> str:
    """Official name of a transformers key (with a `<part>` marker for a tensor to join), or DROP;
    raises `CheckpointError` for a key no rule knows."""
    new: str | None = None
    if key.startswith(HF_BACKBONE):
        new = _backbone_name(key[len(HF_BACKBONE) :])
        if new == DROP:
            return DROP
        new = None if new == "?" else "backbone." + new
    elif key.startswith(HF_PIXEL_DECODER):
        new = _rename(key[len(HF_PIXEL_DECODER) :], _PIXEL_DECODER_RULES)
        new = new and "sem_seg_head.pixel_decoder." + new
    elif key.startswith(HF_TRANSFORMER):
        new = _rename(key[len(HF_TRANSFORMER) :], _TRANSFORMER_RULES)
        new = new and "sem_seg_head.predictor." + new
    elif key.startswith("class_predictor."):
        new = "sem_seg_head.predictor.class_embed." + key[len("class_predictor.") :]
    elif key.startswith("criterion."):
        new = key
    if new is None:
        raise CheckpointError(f"no official name for the transformers Mask2Former key {key!r}")
    return new


def convert_hf_mask2former(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `transformers` Mask2Former state dict -> a flat state dict with the official names."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        new = _official_name(key)
        if new == DROP:
            continue
        marker = _PART.search(new)
        if marker is None:
            out[new] = value
            continue
        target = _PART.sub("", new)
        parts.setdefault(target, {})[_JOIN_ORDER[marker.group(1)]] = value
    for target, pieces in parts.items():
        if sorted(pieces) != [0, 1, 2]:
            raise CheckpointError(f"{target}: needs query, key and value parts, found {len(pieces)}")
        out[target] = torch.cat([pieces[i] for i in range(3)], dim=0)
    return out


# ------------------------------------------------------------------------------------ dispatch


def drop_rebuildable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop Swin `relative_position_index` buffers (the model rebuilds them), after checking that each
    one equals the index of its window size."""
    out = {}
    for key, value in state.items():
        if not key.endswith(".relative_position_index"):
            out[key] = value
            continue
        table = state.get(key.replace("relative_position_index", "relative_position_bias_table"))
        if table is None:
            raise CheckpointError(f"{key} without its relative_position_bias_table")
        window = (round(table.shape[0] ** 0.5) + 1) // 2
        if not torch.equal(value.long().reshape(-1), _relative_position_index(window).reshape(-1)):
            raise CheckpointError(f"{key} differs from the standard index of window {window}")
    return out


def _relative_position_index(window: int) -> torch.Tensor:
    """(window², window²): row of the relative position bias table for each (query, key) pair."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def read_state_dict_any(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict with official names from a `.pkl` (detectron2), a `.safetensors` file or a
    `save_pretrained` folder (converted when it has the `transformers` layout), or a `.pt` / `.pth`."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path.parent}: a checkpoint folder needs a model.safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".pkl":
        state = read_detectron2_pkl(path)
    elif path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = read_state_dict(path)
    if is_hf_mask2former(state):
        state = convert_hf_mask2former(state)
    return drop_rebuildable(state)


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model` after the strict key and shape check of `models.checkpoint`."""
    state = check_state_dict(model, state)
    dtype_of = {k: v.dtype for k, v in model.state_dict().items()}
    state = {k: v.to(dtype_of[k]) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False)


def load_any_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Read any supported layout (`read_state_dict_any`) and load it strictly into `model`."""
    load_state_dict_strict(model, read_state_dict_any(path))
