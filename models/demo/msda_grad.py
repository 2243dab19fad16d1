"""Gradients through `openset::ms_deform_attn` for training the demo model.

The operator is registered for inference only (its fast CPU kernel has no backward). Training keeps
the operator in the forward pass and differentiates the grid_sample reference in the backward pass:
the reference computes the same function, so its gradient is the operator's gradient.
`enable_msda_gradients()` registers that backward once per process.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from models.ops.op import ms_deform_attn_op
from models.ops.reference import ms_deform_attn_reference


def _setup_context(ctx, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """d(output)/d(value, sampling_locations, attention_weights) through the reference."""
    value, shapes, starts, locations, weights = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
        grad_value, grad_locations, grad_weights = torch.autograd.grad(out, leaves, grad_output)
    return grad_value, None, None, grad_locations, grad_weights


@functools.cache
def enable_msda_gradients() -> None:
    """Register the backward of `openset::ms_deform_attn` (once; a no-op if one is registered)."""
    with contextlib.suppress(RuntimeError):  # a backward is registered already
        ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
