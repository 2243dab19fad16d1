"""Load X-Decoder checkpoints as released, strictly, and make the deterministic reference checkpoint.

Released checkpoints are flat state dicts of the inner model (no prefix, no wrapper), saved with
torch.save. We read them with `torch.load(weights_only=True)` (or safetensors) and check them against
the model: any missing, unexpected or mis-shaped key is a `CheckpointError` naming the keys. The only
tolerated gaps are the rebuildable buffers and loss-only keys listed below. A `{"model": state_dict}`
wrapper, as written by some training loops, is unwrapped when it is the file's only entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

# Buffers the model builds itself: absent from a file is fine, present must match in shape.
REBUILDABLE_BUFFERS = ("sem_seg_head.predictor.self_attn_mask",)
# Keys of the training loss, not part of the inference model: ignored when present.
LOSS_ONLY_PREFIXES = ("criterion.",)


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model; the message lists the offending keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat state dict from .pt/.pth (weights_only) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refuses anything that is not plain tensors and containers
        raise CheckpointError(f"{path}: not a weights-only checkpoint ({exc})") from exc
    if isinstance(obj, dict) and set(obj) == {"model"} and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a flat state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:20]))}")
    return obj


def _list(keys: list[str], limit: int = 20) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def tied_key_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Groups of two or more keys whose tensors share storage (a module registered under several
    names, e.g. OpenSeeD's box head): every name is listed by `state_dict()`."""
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        if value.numel() and value.device.type != "meta":
            groups.setdefault((value.data_ptr(), tuple(value.shape), value.stride()), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `state` to load into `model`; raises `CheckpointError` on any mismatch,
    including tied keys (one tensor in the model) whose values in the file differ."""
    expected = model.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith(LOSS_ONLY_PREFIXES)}
    missing = [k for k in expected if k not in kept and k not in REBUILDABLE_BUFFERS]
    unexpected = [k for k in kept if k not in expected]
    mis_shaped = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in kept.items()
        if k in expected and v.shape != expected[k].shape
    ]
    differing_ties = [
        f"{group[0]} and its {len(group) - 1} tied names"
        for group in tied_key_groups(expected)
        if all(k in kept and kept[k].shape == kept[group[0]].shape for k in group)
        and not all(torch.equal(kept[group[0]], kept[k]) for k in group[1:])
    ]
    problems = []
    if differing_ties:
        problems.append(f"tied keys with different values: {_list(differing_ties, 3)}")
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys: {_list(mis_shaped)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(problems))
    return kept


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a released (or reference) checkpoint into `model`, strictly."""
    state = check_state_dict(model, read_state_dict(path))
    dtype_of = {k: v.dtype for k, v in model.state_dict().items()}
    state = {k: v.to(dtype_of[k]) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quick_hash(path: str | Path, sample: int = 1 << 20) -> str:
    """A cheap identity for big files: sha256 of the size and the first and last `sample` bytes."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(sample, size - sample))
            h.update(f.read(sample))
    return h.hexdigest()


# ---------------------------------------------------------------------------- reference checkpoint


def reference_tensor(key: str, shape: list[int]) -> torch.Tensor:
    """The deterministic value of one parameter in the reference checkpoint.

    x = standard normal float32 from numpy PCG64 seeded with crc32(key); then:
    0-d: 2.65926 for `*logit_scale`, else 1.0; 1-d bias: 0.02 x; other 1-d: 1 + 0.1 x;
    n-d: x / sqrt(prod(shape[1:])).
    """
    if not shape:
        return torch.tensor(2.6592600 if key.endswith("logit_scale") else 1.0)
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode())))
    x = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        x = 0.02 * x if key.endswith("bias") else 1.0 + 0.1 * x
    else:
        x = x / np.float32(math.sqrt(math.prod(shape[1:])))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def reference_state_dict(keys_json: str | Path) -> dict[str, torch.Tensor]:
    """All float32 parameters of a key manifest (buffers are not written; aliases share storage)."""
    entries = json.loads(Path(keys_json).read_text())["entries"]
    params = [e for e in entries if e["kind"] == "parameter" and e["dtype"] == "float32"]
    state = {e["key"]: reference_tensor(e["key"], e["shape"]) for e in params if not e.get("alias_of")}
    for e in params:
        if e.get("alias_of"):
            state[e["key"]] = state[e["alias_of"]]
    return state


def fingerprint(state: dict[str, torch.Tensor]) -> float:
    """Sum of |w| over all tensors in float64 (the READMEs quote it for the reference files)."""
    return float(sum(t.double().abs().sum() for t in state.values()))


def reference_checkpoint(keys_json: str | Path, cache_dir: str | Path) -> Path:
    """Path of the reference checkpoint for `keys_json`, written into `cache_dir` on first use.

    The file name carries a hash of the manifest, so a changed manifest makes a new file.
    """
    keys_json = Path(keys_json)
    digest = hashlib.sha256(keys_json.read_bytes()).hexdigest()[:12]
    out = Path(cache_dir) / f"{keys_json.parent.name}_ref_{digest}.pt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        torch.save(reference_state_dict(keys_json), tmp)
        tmp.replace(out)
    return out
