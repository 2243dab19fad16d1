"""Inference precision and compilation of a model: the `precision` and `compile` options of the Predictor.

    PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
    prepare_model(model, precision, compile=False, device="cuda")   # once, after loading
    with precision_context(precision, device):                        # around every forward
        ...

- fp32: the reference; nothing changes.
- tf32: float32 tensors, matmuls and convolutions on TF32 tensor cores (CUDA only: torch's TF32
  switches are turned on inside `precision_context` and restored after it; nothing on CPU).
- bf16 / fp16: `torch.autocast` mixed precision. Matmuls, convolutions and attention run in the low
  precision; every LayerNorm and GroupNorm and the multi-scale deformable attention run in float32
  (their inputs are cast up, autocast is off inside them), as do the antialiased mask resizes of the
  decoder and postprocessing (which need float32 on CPU). fp16 is meant for CUDA.

fp32 stays the default: a lower precision is a choice made per deployment after the task-level parity
check of `load_tests/gpu_bench_xdecoder.py` (mask IoU >= 0.99 and the same labels as fp32). Measured on
an H200 with X-Decoder Focal-T (load_tests/RESULTS.md): tf32 and fp16 pass, bf16 does not (IoU 0.986).

`compile` runs `torch.compile` on the backbone and the pixel decoder (most of the FLOPs, no
data-dependent control flow) with static shapes: one graph per size bucket of the batcher, each
compiled on first use; on CUDA the mode is "reduce-overhead", which replays CUDA graphs (the outputs of
each compiled part are cloned, since the next replay reuses their memory).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from models.ops.module import MSDeformAttn

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLOAT32_MODULES = (nn.LayerNorm, nn.GroupNorm, MSDeformAttn)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def run_in_float32(module: nn.Module) -> None:
    """Make `module` compute in float32 under autocast: floating inputs are cast up and autocast is
    off inside its forward (its output stays float32). Parameters and state-dict keys do not change."""
    forward: Callable[..., Any] = module.forward

    @functools.wraps(forward)
    def float32_forward(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            args = tuple(_to_float32(a) for a in args)
            kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
            return forward(*args, **kwargs)

    module.forward = float32_forward


def prepare_model(model: nn.Module, precision: str, compile: bool = False, device: str = "cpu") -> None:
    """Set `model` up for `precision` (see the module docstring) and optionally compile its image
    encoder. Call once, after the weights are loaded and the model is on its device."""
    check_precision(precision)
    if precision in AUTOCAST_DTYPES:
        for module in model.modules():
            if isinstance(module, FLOAT32_MODULES):
                run_in_float32(module)
    if compile:
        on_cuda = torch.device(device).type == "cuda"
        for i, name in enumerate(("backbone", "sem_seg_head.pixel_decoder")):
            module = model.get_submodule(name)
            if on_cuda:
                compile_with_cuda_graphs(module, new_step=i == 0)
            else:
                module.compile(mode="default", dynamic=False)


def compile_with_cuda_graphs(module: nn.Module, new_step: bool) -> None:
    """torch.compile `module.forward` with CUDA graphs ("reduce-overhead"). A graph's outputs live in
    memory its next replay overwrites, so they are cloned before they leave; `new_step` marks the
    start of a model invocation (the first compiled part of the image encoder)."""
    compiled = torch.compile(module.forward, mode="reduce-overhead", dynamic=False)

    @functools.wraps(module.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if new_step:
            torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args, **kwargs)
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    module.forward = forward


@contextlib.contextmanager
def precision_context(precision: str, device: str | torch.device) -> Iterator[None]:
    """Autocast for bf16 / fp16 on `device`, the TF32 switches for tf32, nothing for fp32."""
    check_precision(precision)
    if precision == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    elif precision in AUTOCAST_DTYPES:
        with torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[precision]):
            yield
    else:
        yield
