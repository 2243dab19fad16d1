"""Operator cases: a `.json` description with its `.npz` arrays beside it (the format of the shared
golden cases), and the tolerance rule the checks apply to them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# A float32 kernel may sum in any order, so it differs from float64 by a small multiple of the
# float32 rounding noise the case recorded (max |float32 reference - float64 reference|).
NOISE_FACTOR = 32.0
# Used only when a case records no noise and has no float64 output (the README's float32 bound).
FALLBACK_BOUND = 1e-4
INPUT_KEYS = ("value", "value_spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


class NotAnOperatorCase(ValueError):
    """The file pair is some other kind of case (for example a whole-module case)."""


@dataclass
class OperatorCase:
    """One golden case: the five inputs, the expected output and the float32 noise it recorded."""

    name: str
    inputs: tuple[torch.Tensor, ...]  # value, spatial_shapes, level_start_index, locations, weights
    expected: torch.Tensor  # (N, Lq, M * D), float64 when the case has it, else float32
    noise: float | None  # max |float32 - float64| of the reference on these inputs

    def bound(self) -> float:
        """Max abs error allowed for a float32 kernel.

        NOISE_FACTOR times the recorded noise, never below 8 float32 ulps of the output's largest
        magnitude; FALLBACK_BOUND when the case records no noise.
        """
        if self.noise is None:
            return FALLBACK_BOUND
        floor = 8 * float(np.finfo(np.float32).eps) * max(1.0, float(self.expected.abs().max()))
        return max(NOISE_FACTOR * self.noise, floor)


def load_case(json_path: Path) -> OperatorCase:
    """Read `NAME.json` and the `.npz` it names (or `NAME.npz`) from the same folder."""
    meta = json.loads(json_path.read_text())
    npz_path = json_path.with_name(meta.get("file", json_path.stem + ".npz"))
    with np.load(npz_path, allow_pickle=False) as arrays:
        missing = [key for key in (*INPUT_KEYS, "output") if key not in arrays]
        if missing:
            raise NotAnOperatorCase(f"{json_path.name}: no {', '.join(missing)} (not an operator case)")
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(arrays[key])) for key in INPUT_KEYS)
        if "output_f64" in arrays:
            expected = torch.from_numpy(arrays["output_f64"])
            noise = float(np.abs(arrays["output"].astype(np.float64) - arrays["output_f64"]).max())
        else:
            expected = torch.from_numpy(arrays["output"])
            noise = meta.get("max_abs_diff_f32_vs_f64")
    return OperatorCase(name=meta.get("name", json_path.stem), inputs=inputs, expected=expected, noise=noise)


def find_cases(paths: list[Path]) -> list[Path]:
    """The case `.json` files among `paths` (files, or folders searched one level deep)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(p for p in sorted(path.glob("*.json")) if p.with_suffix(".npz").exists())
        elif path.suffix == ".json":
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: expected a case .json or a folder of cases")
    return found
