// Patch merging of the global branch: 2x2 gather (odd sides zero-padded) + LayerNorm(4C).
//
// x is (B, H*W, C) tokens; output row (b, i, j) of (B, ceil(H/2)*ceil(W/2), 4C) holds the
// tokens (2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1) in that order (slot q = dy + 2*dx),
// zeros where a token falls outside the grid, normalised over the 4C values.
#pragma once

#include "common.h"

#include <optional>
#include <tuple>

namespace hifuse {

#if defined(__CUDACC__)
#define HIFUSE_HOST_DEVICE __host__ __device__
#else
#define HIFUSE_HOST_DEVICE
#endif

struct MergeGeometry {
  int64_t b, h, w, c, h2, w2;
  HIFUSE_HOST_DEVICE int64_t rows() const { return b * h2 * w2; }
};

MergeGeometry patch_merge_check(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
                                const at::Tensor& bias);

// The output dtype: x's, or out_dtype when given (x's, or a 16-bit float for float32 x).
at::ScalarType patch_merge_out_dtype(const at::Tensor& x, std::optional<at::ScalarType> out_dtype);

MergeGeometry patch_merge_check_backward(const at::Tensor& grad_out, const at::Tensor& x, int64_t H,
                                         int64_t W, const at::Tensor& weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_norm_cpu(
    const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight, const at::Tensor& bias,
    double eps, std::optional<at::ScalarType> out_dtype);

// grad_after (optional, x's shape): a gradient of x from another reader, added to x's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& grad_after);

// grad_after as x's gradient adds it: contiguous, in x's dtype (checked), or nullopt.
std::optional<at::Tensor> patch_merge_grad_after(const std::optional<at::Tensor>& grad_after, const at::Tensor& x);

// Offset of element k (slot q = k / C, channel k % C) of output row `row` in x, or -1 when
// that slot falls in the padding.
HIFUSE_HOST_DEVICE inline int64_t merge_source(const MergeGeometry& g, int64_t row, int64_t k) {
  const int64_t per_image = g.h2 * g.w2;
  const int64_t b = row / per_image, rem = row % per_image;
  const int64_t i = rem / g.w2, j = rem % g.w2;
  const int64_t q = k / g.c, ch = k % g.c;
  const int64_t y = 2 * i + (q & 1), x = 2 * j + (q >> 1);
  if (y >= g.h || x >= g.w) return -1;
  return ((b * g.h + y) * g.w + x) * g.c + ch;
}

}  // namespace hifuse
