// Multi-scale deformable attention, forward only, on the CPU.
//
// One task per (batch, query) pair, spread over threads with at::parallel_for (OpenMP backend).
// For every head, level and point the task computes the bilinear corners once and adds the
// weighted corner rows of `value` (D contiguous numbers each) into the head's accumulator.
// Accumulation happens in the op-math type (float for half/bfloat16 inputs).
//
// Conventions (see models/ops/reference.py): value (N, S, M, D); spatial_shapes (L, 2) rows
// (H, W); level_start_index (L,); sampling_locations (N, Lq, M, L, P, 2) as normalised (x, y);
// attention_weights (N, Lq, M, L, P); output (N, Lq, M * D). Pixel (i, j) has its centre at
// (x, y) = ((j + 0.5) / W, (i + 0.5) / H); neighbours outside the map contribute zero.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Adds weight * row into out. kDepth > 0 fixes the row length at compile time (fully unrolled,
// accumulators in registers); kDepth == 0 reads it from `depth`.
template <int kDepth, typename scalar_t, typename acc_t>
inline void add_row(const scalar_t* row, acc_t weight, acc_t* out, int64_t depth) {
  const int64_t n = kDepth > 0 ? kDepth : depth;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    out[c] += weight * static_cast<acc_t>(row[c]);
  }
}

struct Problem {
  int64_t batch, spatial, heads, depth, queries, levels, points;
  std::vector<int64_t> heights, widths, starts;
};

// One (batch, query) row: every head, level and point.
template <int kDepth, typename scalar_t>
void sample_row(const Problem& pb, const scalar_t* value_n, const scalar_t* loc, const scalar_t* attn,
                scalar_t* out, at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t depth = kDepth > 0 ? kDepth : pb.depth;
  const int64_t row_stride = pb.heads * depth;  // distance between two positions of S
  for (int64_t m = 0; m < pb.heads; ++m) {
    std::fill(acc, acc + depth, acc_t(0));
    for (int64_t l = 0; l < pb.levels; ++l) {
      const int64_t h = pb.heights[l];
      const int64_t w = pb.widths[l];
      const scalar_t* base = value_n + (pb.starts[l] * pb.heads + m) * depth;
      for (int64_t p = 0; p < pb.points; ++p) {
        const int64_t k = (m * pb.levels + l) * pb.points + p;
        const acc_t u = static_cast<acc_t>(loc[2 * k]) * w - acc_t(0.5);
        const acc_t v = static_cast<acc_t>(loc[2 * k + 1]) * h - acc_t(0.5);
        if (!(u > -1 && v > -1 && u < w && v < h)) {
          continue;  // all four neighbours are outside the map (also catches NaN)
        }
        const acc_t a = static_cast<acc_t>(attn[k]);
        const acc_t u0f = std::floor(u);
        const acc_t v0f = std::floor(v);
        const int64_t u0 = static_cast<int64_t>(u0f);
        const int64_t v0 = static_cast<int64_t>(v0f);
        const acc_t fu = u - u0f;
        const acc_t fv = v - v0f;
        const scalar_t* top_left = base + (v0 * w + u0) * row_stride;
        const int64_t right = row_stride;
        const int64_t down = w * row_stride;
        if (u0 >= 0 && v0 >= 0 && u0 + 1 < w && v0 + 1 < h) {  // the common case: all inside
          add_row<kDepth>(top_left, a * (1 - fv) * (1 - fu), acc, depth);
          add_row<kDepth>(top_left + right, a * (1 - fv) * fu, acc, depth);
          add_row<kDepth>(top_left + down, a * fv * (1 - fu), acc, depth);
          add_row<kDepth>(top_left + down + right, a * fv * fu, acc, depth);
          continue;
        }
        const bool left_ok = u0 >= 0, right_ok = u0 + 1 < w, top_ok = v0 >= 0, bottom_ok = v0 + 1 < h;
        if (top_ok && left_ok) add_row<kDepth>(top_left, a * (1 - fv) * (1 - fu), acc, depth);
        if (top_ok && right_ok) add_row<kDepth>(top_left + right, a * (1 - fv) * fu, acc, depth);
        if (bottom_ok && left_ok) add_row<kDepth>(top_left + down, a * fv * (1 - fu), acc, depth);
        if (bottom_ok && right_ok) add_row<kDepth>(top_left + down + right, a * fv * fu, acc, depth);
      }
    }
    for (int64_t c = 0; c < depth; ++c) {
      out[m * depth + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// One task per (batch, query) row, spread over threads by at::parallel_for.
template <int kDepth, typename scalar_t>
void forward_rows(const Problem& pb, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                  scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_row = pb.heads * pb.levels * pb.points;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, per_row));
  at::parallel_for(0, pb.batch * pb.queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pb.depth);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / pb.queries;
      sample_row<kDepth>(pb, value + n * pb.spatial * pb.heads * pb.depth, loc + row * per_row * 2,
                         attn + row * per_row, out + row * pb.heads * pb.depth, acc.data());
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Problem& pb, const torch::Tensor& value, const torch::Tensor& locations,
                    const torch::Tensor& weights, torch::Tensor& output) {
  const scalar_t* v = value.data_ptr<scalar_t>();
  const scalar_t* loc = locations.data_ptr<scalar_t>();
  const scalar_t* attn = weights.data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  // Fixed head dims of the X-Decoder family (256 / 8 and 512 / 8) get unrolled code.
  if (pb.depth == 32) {
    forward_rows<32>(pb, v, loc, attn, out);
  } else if (pb.depth == 64) {
    forward_rows<64>(pb, v, loc, attn, out);
  } else {
    forward_rows<0>(pb, v, loc, attn, out);
  }
}

torch::Tensor ms_deform_attn_forward(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                                     const torch::Tensor& level_start_index,
                                     const torch::Tensor& sampling_locations,
                                     const torch::Tensor& attention_weights) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn CPU kernel: value must be on the CPU");
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D)");
  TORCH_CHECK(sampling_locations.dim() == 6, "sampling_locations must be (N, Lq, M, L, P, 2)");
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be (N, Lq, M, L, P)");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "spatial_shapes must be (L, 2)");
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.numel() == levels, "level_start_index must be (L,)");
  TORCH_CHECK(sampling_locations.size(3) == levels && attention_weights.size(3) == levels,
              "sampling_locations / attention_weights disagree with spatial_shapes on L");
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2),
              "sampling_locations must share N and M with value");
  TORCH_CHECK(sampling_locations.size(5) == 2, "sampling_locations must end in (x, y)");
  for (int64_t dim = 0; dim < 5; ++dim) {
    TORCH_CHECK(attention_weights.size(dim) == sampling_locations.size(dim),
                "attention_weights must be sampling_locations' shape without the last axis");
  }
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share a dtype");

  const auto shapes = spatial_shapes.to(torch::kCPU, torch::kLong).contiguous();
  const auto starts_t = level_start_index.to(torch::kCPU, torch::kLong).contiguous();
  Problem pb{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
             levels, sampling_locations.size(4)};
  const int64_t* shape_ptr = shapes.data_ptr<int64_t>();
  const int64_t* start_ptr = starts_t.data_ptr<int64_t>();
  for (int64_t l = 0; l < levels; ++l) {
    pb.heights.push_back(shape_ptr[2 * l]);
    pb.widths.push_back(shape_ptr[2 * l + 1]);
    pb.starts.push_back(start_ptr[l]);
    TORCH_CHECK(pb.starts[l] >= 0 && pb.starts[l] + pb.heights[l] * pb.widths[l] <= value.size(1),
                "level ", l, " does not fit inside value's S axis");
  }

  const auto value_c = value.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  auto output = torch::empty({value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)},
                             value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    forward_kernel<scalar_t>(pb, value_c, loc_c, attn_c, output);
  });
  return output;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_forward, "multi-scale deformable attention forward (CPU)");
}
