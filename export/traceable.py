"""Export-time forms of model pieces whose eager code does not trace into size-independent graphs.

Inside `traceable(module)`, for an unpadded batch (what every exported graph runs):

- `XDecoder._cross_mask` opens fully blocked rows with `&` instead of an in-place masked assignment
  (which exports as a bool `Where` that ONNX Runtime has no kernel for);
- `MSDeformAttnTransformerEncoderOnly.forward` takes the level sizes from the traced shapes
  (spatial shapes, level starts, reference points and the final split), where the eager code turns
  them into Python numbers that the tracer would freeze at the example size.

Both compute the same values as the eager code (`openset export verify` compares them with it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from models.decoders.xdecoder import DecoderMemory, XDecoder
from models.pixel_decoders.ms_deform import MSDeformAttnTransformerEncoderOnly


def cross_mask(decoder: XDecoder, attn: torch.Tensor, memory: DecoderMemory, level: int) -> torch.Tensor:
    """(B, R, HW) blocked -> (B*heads, R, HW) with fully blocked rows opened (no padded keys)."""
    del memory, level
    attn = attn & ~attn.all(dim=-1, keepdim=True)
    return attn.repeat_interleave(decoder.num_heads, dim=0)


def level_points(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pixel centres of an (h, w) level normalised to [0, 1], row-major: (h*w, 2) as (x, y)."""
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)


def deform_encoder_forward(
    encoder: MSDeformAttnTransformerEncoderOnly,
    srcs: list[torch.Tensor],
    pos: list[torch.Tensor],
    valids: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """`MSDeformAttnTransformerEncoderOnly.forward` for an unpadded batch, sizes kept symbolic."""
    if any(v is not None for v in valids):
        raise ValueError("exported graphs run unpadded batches")
    b, d = srcs[0].shape[:2]
    flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)
    flat_pos = torch.cat(
        [p.flatten(2).transpose(1, 2) + encoder.level_embed[i] for i, p in enumerate(pos)], dim=1
    )
    shapes = torch.stack([torch._shape_as_tensor(s)[-2:] for s in srcs])  # (L, 2) int64
    counts = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat((counts.new_zeros(1), counts.cumsum(0)[:-1]))
    points = torch.cat([level_points(s.shape[-2], s.shape[-1]) for s in srcs], dim=0)  # (S, 2)
    reference = points[None, :, None].expand(b, -1, len(srcs), 2)
    for layer in encoder.encoder.layers:
        flat = layer(flat, flat_pos, reference, shapes, starts, None)
    out, start = [], 0
    for s in srcs:
        h, w = s.shape[-2:]
        out.append(flat[:, start : start + h * w].transpose(1, 2).reshape(b, d, h, w))
        start = start + h * w
    return out


@contextlib.contextmanager
def traceable(module: nn.Module) -> Iterator[None]:
    """Use the export forms above for every matching submodule of `module` inside the block."""
    patched: list[tuple[nn.Module, str]] = []
    for sub in module.modules():
        if isinstance(sub, XDecoder):
            sub._cross_mask = functools.partial(cross_mask, sub)  # type: ignore[method-assign]
            patched.append((sub, "_cross_mask"))
        elif isinstance(sub, MSDeformAttnTransformerEncoderOnly):
            sub.forward = functools.partial(deform_encoder_forward, sub)  # type: ignore[method-assign]
            patched.append((sub, "forward"))
    try:
        yield
    finally:
        for sub, name in patched:
            delattr(sub, name)
