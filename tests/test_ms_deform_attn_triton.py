"""The Triton kernel on CPU through the Triton interpreter (`TRITON_INTERPRET=1`).

Triton reads that variable when it is imported, so each test runs this file as a script in a
fresh interpreter process; the script prints one JSON line of measured errors and the test
asserts on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

# (shapes, batch, queries, heads, head_dim, points); head_dim 6 exercises the channel mask.
TINY_CASES = [
    ([(1, 1)], 1, 3, 2, 4, 1),
    ([(5, 3), (1, 1), (2, 7)], 2, 9, 3, 8, 2),
    ([(4, 6), (3, 3)], 3, 5, 2, 6, 3),
]
# fp32 accumulation: the error is the rounding of the inputs' products and of the output
TOLERANCE = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 2e-2}


def measure_tiny_cases() -> list[dict[str, object]]:
    """Triton vs the float64 reference on the same (rounded) inputs, for every dtype."""
    from models.ops import ms_deform_attn_reference, ms_deform_attn_triton
    from models.ops.synthetic import make_inputs

    results = []
    for shapes, batch, queries, heads, head_dim, points in TINY_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            inputs = make_inputs(shapes, batch, queries, heads, head_dim, points, dtype=dtype, margin=0.4)
            output = ms_deform_attn_triton(*inputs, block_q=4)
            value, spatial_shapes, starts, locations, weights = inputs
            expected = ms_deform_attn_reference(
                value.double(), spatial_shapes, starts, locations.double(), weights.double()
            )
            results.append(
                {
                    "case": f"{shapes} b{batch} q{queries} d{head_dim}",
                    "dtype": str(dtype).removeprefix("torch."),
                    "output_dtype": str(output.dtype).removeprefix("torch."),
                    "shape_ok": tuple(output.shape) == tuple(expected.shape),
                    "max_abs": float((output.double() - expected).abs().max()),
                }
            )
    return results


def measure_golden_case(json_path: str) -> list[dict[str, object]]:
    from models.ops import ms_deform_attn_triton
    from models.ops.cases import load_case

    case = load_case(Path(json_path))
    output = ms_deform_attn_triton(*case.inputs, block_q=128)
    error = float((output.double() - case.expected.double()).abs().max())
    return [{"case": case.name, "max_abs": error, "bound": case.bound()}]


def run_interpreted(*args: str) -> list[dict[str, object]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_ms_deform_attn_triton", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_triton_interpreter_fp32_fp16_bf16_on_tiny_shapes() -> None:
    results = run_interpreted("tiny")
    assert len(results) == 3 * len(TINY_CASES)
    for result in results:
        assert result["shape_ok"], result
        assert result["output_dtype"] == result["dtype"], result
        assert result["max_abs"] <= TOLERANCE[result["dtype"]], result


@pytest.mark.slow
def test_triton_interpreter_on_the_golden_decoder_case(reference_root: Path) -> None:
    (result,) = run_interpreted("golden", str(reference_root / "ms_deform_attn" / "case02_dec_b2_l4.json"))
    assert result["max_abs"] <= result["bound"], result


if __name__ == "__main__":
    from models.ops.triton_op import interpreter_enabled

    if not interpreter_enabled():
        raise SystemExit("run with TRITON_INTERPRET=1")
    measured = measure_tiny_cases() if sys.argv[1] == "tiny" else measure_golden_case(sys.argv[2])
    print(json.dumps(measured))
