// Multi-scale deformable attention, forward only, on the CPU.
//
// One task per (batch, query) pair, spread over threads with at::parallel_for (OpenMP backend).
// For every head, level and point the task computes the bilinear corners once and adds the
// weighted corner rows of `value` (D contiguous numbers each) into the head's output row.
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

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename scalar_t, typename acc_t>
inline void add_corner(const scalar_t* row, acc_t weight, acc_t* out, int64_t depth) {
#pragma omp simd
  for (int64_t c = 0; c < depth; ++c) {
    out[c] += weight * static_cast<acc_t>(row[c]);
  }
}

template <typename scalar_t>
void forward_kernel(const torch::Tensor& value, const std::vector<int64_t>& heights,
                    const std::vector<int64_t>& widths, const std::vector<int64_t>& starts,
                    const torch::Tensor& locations, const torch::Tensor& weights,
                    torch::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = value.size(0);
  const int64_t spatial = value.size(1);
  const int64_t heads = value.size(2);
  const int64_t depth = value.size(3);
  const int64_t queries = locations.size(1);
  const int64_t levels = locations.size(3);
  const int64_t points = locations.size(4);

  const scalar_t* value_ptr = value.data_ptr<scalar_t>();
  const scalar_t* loc_ptr = locations.data_ptr<scalar_t>();
  const scalar_t* weight_ptr = weights.data_ptr<scalar_t>();
  scalar_t* out_ptr = output.data_ptr<scalar_t>();

  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, heads * levels * points));
  at::parallel_for(0, batch * queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(depth);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / queries;
      const scalar_t* value_n = value_ptr + n * spatial * heads * depth;
      // Both index tensors are contiguous with (m, l, p) innermost for this (n, q).
      const scalar_t* loc = loc_ptr + task * heads * levels * points * 2;
      const scalar_t* attn = weight_ptr + task * heads * levels * points;
      scalar_t* out = out_ptr + task * heads * depth;
      for (int64_t m = 0; m < heads; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t l = 0; l < levels; ++l) {
          const int64_t h = heights[l];
          const int64_t w = widths[l];
          const scalar_t* level_base = value_n + (starts[l] * heads + m) * depth;
          const int64_t row_stride = heads * depth;  // distance between two positions of S
          for (int64_t p = 0; p < points; ++p) {
            const int64_t k = (m * levels + l) * points + p;
            const acc_t u = static_cast<acc_t>(loc[2 * k]) * w - acc_t(0.5);
            const acc_t v = static_cast<acc_t>(loc[2 * k + 1]) * h - acc_t(0.5);
            const acc_t a = static_cast<acc_t>(attn[k]);
            if (!(u > -1 && v > -1 && u < w && v < h)) {
              continue;  // all four neighbours are outside the map (also catches NaN)
            }
            const acc_t u0f = std::floor(u);
            const acc_t v0f = std::floor(v);
            const int64_t u0 = static_cast<int64_t>(u0f);
            const int64_t v0 = static_cast<int64_t>(v0f);
            const acc_t fu = u - u0f;
            const acc_t fv = v - v0f;
            const bool left = u0 >= 0, right = u0 + 1 < w, top = v0 >= 0, bottom = v0 + 1 < h;
            if (top && left) {
              add_corner(level_base + (v0 * w + u0) * row_stride, a * (1 - fv) * (1 - fu), acc.data(), depth);
            }
            if (top && right) {
              add_corner(level_base + (v0 * w + u0 + 1) * row_stride, a * (1 - fv) * fu, acc.data(), depth);
            }
            if (bottom && left) {
              add_corner(level_base + ((v0 + 1) * w + u0) * row_stride, a * fv * (1 - fu), acc.data(), depth);
            }
            if (bottom && right) {
              add_corner(level_base + ((v0 + 1) * w + u0 + 1) * row_stride, a * fv * fu, acc.data(), depth);
            }
          }
        }
        for (int64_t c = 0; c < depth; ++c) {
          out[m * depth + c] = static_cast<scalar_t>(acc[c]);
        }
      }
    }
  });
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
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share a dtype");

  const auto shapes = spatial_shapes.to(torch::kCPU, torch::kLong).contiguous();
  const auto starts_t = level_start_index.to(torch::kCPU, torch::kLong).contiguous();
  std::vector<int64_t> heights(levels), widths(levels), starts(levels);
  for (int64_t l = 0; l < levels; ++l) {
    heights[l] = shapes[l][0].item<int64_t>();
    widths[l] = shapes[l][1].item<int64_t>();
    starts[l] = starts_t[l].item<int64_t>();
    TORCH_CHECK(starts[l] >= 0 && starts[l] + heights[l] * widths[l] <= value.size(1),
                "level ", l, " does not fit inside value's S axis");
  }

  const auto value_c = value.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  auto output = torch::empty({value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)},
                             value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    forward_kernel<scalar_t>(value_c, heights, widths, starts, loc_c, attn_c, output);
  });
  return output;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_forward, "multi-scale deformable attention forward (CPU)");
}
