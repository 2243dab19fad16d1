"""The Triton kernel of multi-scale deformable attention (imported only when Triton is installed).

One program computes BLOCK_Q (batch, query) rows of one head: for every level and point it loads
the sampling position of each row, finds the four bilinear neighbours (half-pixel centres, zero
outside the map) and adds their weighted D-vectors into an fp32 accumulator. `triton_op.py`
launches it.
"""

import triton
import triton.language as tl


@triton.jit
def msda_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    n_rows,
    n_queries,
    n_spatial,
    n_levels,
    N_HEADS: tl.constexpr,
    N_POINTS: tl.constexpr,
    DEPTH: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows are flattened (batch, query) pairs; program (i, m) does rows i*BLOCK_Q... for head m."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    batch = rows64 // n_queries
    channels = tl.arange(0, BLOCK_D)
    channel_mask = channels < DEPTH
    # Offset of (batch, position 0, head, channel 0) in value (N, S, M, D).
    value_row0 = batch * n_spatial * N_HEADS * DEPTH + head * DEPTH
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(n_levels):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int64)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int64)
        start = tl.load(starts_ptr + level).to(tl.int64)
        h_f = height.to(tl.float32)
        w_f = width.to(tl.float32)
        for point in tl.static_range(N_POINTS):
            # (rows, M, L, P) index of this head/level/point.
            k = ((rows64 * N_HEADS + head) * n_levels + level) * N_POINTS + point
            x = tl.load(loc_ptr + 2 * k, mask=row_mask, other=-2.0).to(tl.float32)
            y = tl.load(loc_ptr + 2 * k + 1, mask=row_mask, other=-2.0).to(tl.float32)
            a = tl.load(attn_ptr + k, mask=row_mask, other=0.0).to(tl.float32)
            u = x * w_f - 0.5
            v = y * h_f - 0.5
            inside = row_mask & (u > -1.0) & (v > -1.0) & (u < w_f) & (v < h_f)
            u0f = tl.floor(u)
            v0f = tl.floor(v)
            fu = u - u0f
            fv = v - v0f
            u0 = u0f.to(tl.int64)
            v0 = v0f.to(tl.int64)
            for corner in tl.static_range(4):
                du = corner % 2  # 0: left neighbour, 1: right neighbour
                dv = corner // 2  # 0: upper neighbour, 1: lower neighbour
                cu = u0 + du
                cv = v0 + dv
                weight_u = du * fu + (1 - du) * (1.0 - fu)
                weight_v = dv * fv + (1 - dv) * (1.0 - fv)
                ok = inside & (cu >= 0) & (cu < width) & (cv >= 0) & (cv < height)
                position = start + cv * width + cu
                offsets = value_row0 + position * (N_HEADS * DEPTH)
                ptrs = value_ptr + offsets[:, None] + channels[None, :]
                gathered = tl.load(ptrs, mask=ok[:, None] & channel_mask[None, :], other=0.0)
                acc += (a * weight_u * weight_v)[:, None] * gathered.to(tl.float32)
    out_offsets = (rows64 * N_HEADS + head) * DEPTH
    out_ptrs = out_ptr + out_offsets[:, None] + channels[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & channel_mask[None, :])
