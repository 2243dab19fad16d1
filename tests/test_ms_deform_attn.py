"""`openset::ms_deform_attn`: golden cases, random shapes, the C++ kernel, fake tensors, the
missing-compiler fallback and the check CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.ops import cpu_kernel_available, ms_deform_attn, ms_deform_attn_cpu, ms_deform_attn_reference
from models.ops.cases import find_cases, load_case
from models.ops.check import main as check_main
from models.ops.synthetic import make_inputs
from tests.conftest import REPO_ROOT

# Shapes that stress the indexing: 1x1 levels, odd and non-square sizes, one row, one column.
ODD_SHAPES = [
    [(1, 1)],
    [(7, 5), (1, 1), (3, 9)],
    [(1, 13), (11, 1), (2, 2), (1, 1)],
    [(25, 38), (13, 19), (7, 10), (4, 5)],
]


@pytest.fixture(scope="module")
def golden_cases(reference_root: Path) -> list[Path]:
    cases = find_cases([reference_root / "ms_deform_attn"])
    assert len(cases) >= 2
    return cases


def float64_reference(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    value, shapes, starts, locations, weights = inputs
    return ms_deform_attn_reference(value.double(), shapes, starts, locations.double(), weights.double())


def test_cpu_kernel_is_built() -> None:
    # `make setup` builds it; a failure here means the operator silently runs the slow reference.
    assert cpu_kernel_available()


@pytest.mark.slow
def test_golden_cases_every_cpu_path(golden_cases: list[Path]) -> None:
    for path in golden_cases:
        case = load_case(path)
        bound = case.bound()
        assert bound < 2e-4  # derived from the recorded noise, not the README's loose bound
        for kernel in (ms_deform_attn_reference, ms_deform_attn_cpu, ms_deform_attn):
            output = kernel(*case.inputs)
            assert output.shape == case.expected.shape
            assert output.dtype == torch.float32
            error = (output.double() - case.expected.double()).abs()
            assert error.max() <= bound, (case.name, kernel)
            assert error.mean() <= 1e-5, (case.name, kernel)


def test_operator_dispatches_to_the_cpp_kernel(golden_cases: list[Path]) -> None:
    case = load_case(golden_cases[-1])
    dispatched = torch.ops.openset.ms_deform_attn(*case.inputs)
    assert torch.equal(dispatched, ms_deform_attn_cpu(*case.inputs))


@pytest.mark.parametrize("shapes", ODD_SHAPES, ids=lambda s: "x".join(f"{h}-{w}" for h, w in s))
@pytest.mark.parametrize("batch,n_queries", [(1, None), (3, 17)])
def test_random_shapes_match_float64(
    shapes: list[tuple[int, int]], batch: int, n_queries: int | None
) -> None:
    inputs = make_inputs(
        shapes, batch=batch, n_queries=n_queries, n_heads=4, head_dim=8, n_points=3, margin=0.6
    )
    expected = float64_reference(inputs)
    for kernel in (ms_deform_attn_reference, ms_deform_attn_cpu):
        assert (kernel(*inputs).double() - expected).abs().max() < 2e-5


def test_points_far_outside_give_zero_and_edges_give_partial_values() -> None:
    value, shapes, starts, _, weights = make_inputs([(4, 6)], n_queries=5, n_heads=2, head_dim=4, n_points=1)
    # four points more than a pixel outside, then one a quarter pixel right of the last column
    points = [[-1.0, 0.5], [2.0, 0.5], [0.5, -0.5], [0.5, 1.6], [(6 - 0.25) / 6, 0.5]]
    locations = torch.tensor(points).view(1, 5, 1, 1, 1, 2).expand(1, 5, 2, 1, 1, 2).contiguous()
    output = ms_deform_attn_cpu(value, shapes, starts, locations, weights).view(5, 2, 4)
    assert torch.all(output[:4] == 0)
    # u = 5.25: three quarters of column 5 and a zero quarter from the missing column 6;
    # v = 1.5: half of row 1 and half of row 2.
    column = value[0].view(4, 6, 2, 4)[:, 5]
    expected = weights[0, 4, :, 0, 0, None] * 0.75 * 0.5 * (column[1] + column[2])
    assert torch.allclose(output[4], expected, atol=1e-6)
    reference = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    assert torch.allclose(output.view(1, 5, 8), reference, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cpp_kernel_other_dtypes(dtype: torch.dtype) -> None:
    inputs32 = make_inputs([(5, 7), (2, 3)], batch=2, n_queries=11, n_heads=2, head_dim=16)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs32)
    output = ms_deform_attn_cpu(*inputs)
    assert output.dtype == dtype
    tolerance = {torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    assert (output.double() - float64_reference(inputs)).abs().max() < tolerance


def test_level_start_index_is_honoured_by_the_kernel() -> None:
    # Levels stored in S in the reverse order of spatial_shapes, located only by level_start_index.
    value, shapes, starts, locations, weights = make_inputs(
        [(3, 4), (2, 5)], n_queries=6, n_heads=2, head_dim=4
    )
    first, second = value[:, :12], value[:, 12:]
    swapped = torch.cat([second, first], dim=1)
    output = ms_deform_attn_cpu(swapped, shapes, torch.tensor([10, 0]), locations, weights)
    assert torch.allclose(
        output, ms_deform_attn_reference(value, shapes, starts, locations, weights), atol=1e-6
    )


def test_bad_inputs_are_rejected() -> None:
    value, shapes, starts, locations, weights = make_inputs([(3, 4)], n_queries=2, n_heads=2, head_dim=4)
    with pytest.raises(RuntimeError, match="does not fit"):
        ms_deform_attn_cpu(value, shapes, torch.tensor([5]), locations, weights)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ms_deform_attn_cpu(value.double(), shapes, starts, locations, weights)


def test_fake_implementation_traces_with_export() -> None:
    class Wrapper(torch.nn.Module):
        def forward(self, value, shapes, starts, locations, weights):  # noqa: ANN001, ANN202
            return ms_deform_attn(value, shapes, starts, locations, weights) * 2

    inputs = make_inputs([(3, 4), (2, 2)], batch=2, n_queries=5, n_heads=2, head_dim=4)
    program = torch.export.export(Wrapper(), inputs)
    targets = {str(node.target) for node in program.graph.nodes}
    assert "openset.ms_deform_attn.default" in targets
    assert torch.allclose(program.module()(*inputs), 2 * ms_deform_attn_reference(*inputs), atol=1e-6)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = ms_deform_attn(*(mode.from_tensor(t) for t in inputs))
    assert tuple(fake.shape) == (2, 5, 8)


@pytest.mark.slow
def test_missing_compiler_falls_back_with_one_warning(tmp_path: Path) -> None:
    script = (
        "import warnings, torch\n"
        "from models.ops import ms_deform_attn, ms_deform_attn_reference\n"
        "from models.ops.synthetic import make_inputs\n"
        "inputs = make_inputs([(3, 5)], n_queries=4, n_heads=2, head_dim=4)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    a = ms_deform_attn(*inputs)\n"
        "    b = ms_deform_attn(*inputs)\n"
        "kernel = [w for w in caught if 'could not be built' in str(w.message)]\n"
        "same = torch.equal(a, ms_deform_attn_reference(*inputs))\n"
        "print(len(kernel), same, torch.equal(a, b))\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), OPENSET_EXTENSIONS_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True", "True"]


def write_case(
    folder: Path, name: str, inputs: tuple[torch.Tensor, ...], output: np.ndarray, noise: float
) -> Path:
    keys = ("value", "value_spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    arrays = {key: tensor.numpy() for key, tensor in zip(keys, inputs, strict=True)}
    np.savez(folder / f"{name}.npz", output=output, **arrays)
    meta = {"name": name, "file": f"{name}.npz", "max_abs_diff_f32_vs_f64": noise}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(meta))
    return path


def test_check_cli_passes_good_cases_and_fails_bad_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = make_inputs([(1, 1), (5, 3)], batch=2, n_queries=7, n_heads=2, head_dim=8, margin=0.5)
    expected64 = float64_reference(inputs)
    expected32 = ms_deform_attn_reference(*inputs)
    noise = float((expected32.double() - expected64).abs().max())
    good = write_case(tmp_path, "tiny_1x1", inputs, expected32.numpy(), noise)
    # a case of another kind in the same folder is reported and passed over
    np.savez(tmp_path / "module_case.npz", query=np.zeros(3))
    (tmp_path / "module_case.json").write_text(json.dumps({"name": "module_case"}))
    assert check_main([str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "tiny_1x1" in report and "cpu-cpp" in report and "FAIL" not in report
    assert "skipped module_case.json" in report
    assert check_main([str(tmp_path / "module_case.json")]) == 2

    wrong = expected32.clone()
    wrong[1, 3, 5] += 0.01
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write_case(bad_dir, "tiny_bad", inputs, wrong.numpy(), noise)
    assert check_main([str(good), str(bad_dir)]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_check_cli_on_the_golden_folder(reference_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "models.ops.check", str(reference_root / "ms_deform_attn")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok") >= 4
