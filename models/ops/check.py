"""`python -m models.ops.check PATH...`: every multi-scale deformable attention kernel available
here against operator cases (a `.json` with its `.npz` beside it, or folders of them).

Prints max abs, max relative (to the largest expected magnitude) and mean abs error per case and
kernel, and exits 1 when any kernel exceeds the case's bound (`OperatorCase.bound`). Kernels:
the reference, the C++ CPU kernel, the Triton kernel through the interpreter when the process runs
with `TRITON_INTERPRET=1`, and on a CUDA device the Triton kernel and the reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.ops.cases import NotAnOperatorCase, OperatorCase, find_cases, load_case
from models.ops.cpu_kernel import load_cpu_extension, ms_deform_attn_cpu
from models.ops.reference import ms_deform_attn_reference
from models.ops.triton_op import interpreter_enabled, ms_deform_attn_triton, triton_available

Kernel = Callable[..., torch.Tensor]


def available_kernels() -> tuple[dict[str, tuple[Kernel, str]], list[str]]:
    """Kernels that can run here as name -> (function, device), and notes on those that cannot."""
    kernels: dict[str, tuple[Kernel, str]] = {"reference": (ms_deform_attn_reference, "cpu")}
    skipped: list[str] = []
    if load_cpu_extension() is not None:
        kernels["cpu-cpp"] = (ms_deform_attn_cpu, "cpu")
    else:
        skipped.append("cpu-cpp: the C++ extension could not be built")
    if not triton_available():
        skipped.append("triton: not installed")
    elif interpreter_enabled():
        kernels["triton-interpreter"] = (_interpreted_triton, "cpu")
    else:
        skipped.append("triton-interpreter: run with TRITON_INTERPRET=1 to include it")
    if torch.cuda.is_available():
        kernels["cuda-reference"] = (ms_deform_attn_reference, "cuda")
        if triton_available() and not interpreter_enabled():
            kernels["cuda-triton"] = (ms_deform_attn_triton, "cuda")
    else:
        skipped.append("cuda: no CUDA device")
    return kernels, skipped


def _interpreted_triton(*inputs: torch.Tensor) -> torch.Tensor:
    return ms_deform_attn_triton(*inputs, block_q=128)  # fewer, larger programs interpret faster


def measure(case: OperatorCase, kernel: Kernel, device: str) -> dict[str, float]:
    """Run `kernel` on the case's inputs and compare with its expected output."""
    inputs = [tensor.to(device) for tensor in case.inputs]
    start = time.perf_counter()
    output = kernel(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    expected = case.expected.double()
    if output.shape != expected.shape:
        worst = float("inf")
        return {"max_abs": worst, "max_rel": worst, "mean_abs": worst, "seconds": seconds}
    error = (output.detach().cpu().double() - expected).abs()
    scale = max(float(expected.abs().max()), 1e-12)
    max_abs = float(error.max()) if error.numel() else 0.0
    mean_abs = float(error.mean()) if error.numel() else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale, "mean_abs": mean_abs, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.ops.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="case .json files or folders of them")
    args = parser.parse_args(argv)
    case_paths = find_cases(args.paths)
    if not case_paths:
        print("no operator cases found", file=sys.stderr)
        return 2
    kernels, skipped = available_kernels()
    for note in skipped:
        print(f"skipped {note}")
    print(
        f"{'case':<28} {'kernel':<20} {'max_abs':>10} {'max_rel':>10} {'mean_abs':>10} {'bound':>10}  result"
    )
    failures = 0
    checked = 0
    for case_path in case_paths:
        try:
            case = load_case(case_path)
        except NotAnOperatorCase as error:
            print(f"skipped {error}")
            continue
        checked += 1
        bound = case.bound()
        for name, (kernel, device) in kernels.items():
            result = measure(case, kernel, device)
            ok = result["max_abs"] <= bound
            failures += not ok
            print(
                f"{case.name:<28} {name:<20} {result['max_abs']:>10.3e} {result['max_rel']:>10.3e} "
                f"{result['mean_abs']:>10.3e} {bound:>10.3e}  {'ok' if ok else 'FAIL'}"
            )
    if not checked:
        print("no operator cases among the paths", file=sys.stderr)
        return 2
    print(f"{failures} failure(s)" if failures else "all kernels within bounds")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
