"""The C++/OpenMP CPU kernel: built once with `torch.utils.cpp_extension.load`, then reused.

The source is `csrc/ms_deform_attn_cpu.cpp`. The build goes to `.cache/torch_extensions/` in the
repository (git-ignored) or, for an installed package, to `~/.cache/openset/torch_extensions/`;
`OPENSET_EXTENSIONS_DIR` overrides both. PyTorch rebuilds only when the source or flags change.
When the build fails (no compiler, no ninja), `load_cpu_extension()` returns None after one
warning and the operator falls back to the reference. `python -m models.ops.build` builds it
ahead of time (`make setup` does).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "ms_deform_attn_cpu.cpp"


def _instruction_set() -> tuple[str, list[str]]:
    """("avx2", its flags) when this CPU has AVX2 and FMA (about 2x faster), else ("generic", []).

    The name goes into the extension's name, so a build directory shared with a machine without
    AVX2 never hands it an AVX2 binary.
    """
    try:
        cpu_flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        cpu_flags = set()
    if {"avx2", "fma"} <= cpu_flags:
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


INSTRUCTION_SET, _ISA_FLAGS = _instruction_set()
EXTENSION_NAME = f"openset_ms_deform_attn_cpu_{INSTRUCTION_SET}"


def build_directory() -> Path:
    """Where the compiled extension lives (created on demand)."""
    override = os.environ.get("OPENSET_EXTENSIONS_DIR")
    if override:
        path = Path(override)
    else:
        repo_root = Path(__file__).resolve().parents[2]
        if (repo_root / "pyproject.toml").is_file():
            path = repo_root / ".cache" / "torch_extensions"
        else:
            path = Path.home() / ".cache" / "openset" / "torch_extensions"
    path = path / EXTENSION_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load_cpu_extension() -> ModuleType | None:
    """The compiled extension, or None (with one warning per process) when it cannot be built."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            build_directory=str(build_directory()),
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler or ninja surfaces as various error types
        warnings.warn(
            f"openset: the C++ multi-scale deformable attention kernel could not be built ({error}); "
            "falling back to the slower grid_sample reference on CPU. Install a C++ compiler and "
            "ninja, then run `python -m models.ops.build`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def cpu_kernel_available() -> bool:
    """True when the C++ kernel is built (builds it on first call)."""
    return load_cpu_extension() is not None


def ms_deform_attn_cpu(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The C++ kernel; same arguments and result as `ms_deform_attn_reference`.

    value (N, S, M, D); spatial_shapes (L, 2); level_start_index (L,); sampling_locations
    (N, Lq, M, L, P, 2); attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D). Uses
    `torch.get_num_threads()` threads. Raises RuntimeError when the extension is unavailable.
    """
    extension = load_cpu_extension()
    if extension is None:
        raise RuntimeError("the C++ ms_deform_attn kernel is not built (see the warning above)")
    return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
