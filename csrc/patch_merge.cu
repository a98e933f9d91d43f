// Patch merging gather + LayerNorm, CUDA implementation.
//
// One warp per output row: the 32 lanes gather the row's 4C values (contiguous runs of C
// channels per slot, so loads coalesce), keep Welford partials, combine them with shuffles
// in a fixed butterfly order, then write the normalised row. Backward: a warp per row for
// the input gradient (scattered to the tokens, collision-free), then weight and bias
// gradients as per-chunk partial sums added in order by a second kernel.
#include "patch_merge.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "partial_sums.cuh"
#include "row_stats.cuh"

#include <limits>

namespace hifuse {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kPartialBlocks = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, typename acc_t>
__device__ inline acc_t gather(const scalar_t* x, const MergeGeometry& g, int64_t row, int64_t k) {
  const int64_t src = merge_source(g, row, k);
  return src < 0 ? acc_t(0) : static_cast<acc_t>(x[src]);
}

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                               const acc_t* __restrict__ b, out_t* __restrict__ y,
                               acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out, MergeGeometry g,
                               acc_t eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= g.rows()) return;
  const int64_t n = 4 * g.c;
  ShiftedSums<acc_t> sums;
  for (int64_t k = lane; k < n; k += 32) sums.add(gather<scalar_t, acc_t>(x, g, row, k));
  acc_t count = sums.count, mean = 0, m2 = 0;
  sums.finish(mean, m2);
  for (int offset = 16; offset > 0; offset /= 2) {
    const acc_t n_b = __shfl_xor_sync(0xffffffff, count, offset);
    const acc_t mean_b = __shfl_xor_sync(0xffffffff, mean, offset);
    const acc_t m2_b = __shfl_xor_sync(0xffffffff, m2, offset);
    const acc_t n_ab = count + n_b;
    if (n_ab > 0) {
      const acc_t delta = mean_b - mean;
      mean += delta * n_b / n_ab;
      m2 += m2_b + delta * delta * count * n_b / n_ab;
    }
    count = n_ab;
  }
  const acc_t rstd = rsqrt(m2 / static_cast<acc_t>(n) + eps);
  out_t* out = y + row * n;
  for (int64_t k = lane; k < n; k += 32) {
    out[k] = static_cast<out_t>((gather<scalar_t, acc_t>(x, g, row, k) - mean) * rstd * w[k] + b[k]);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const acc_t* __restrict__ w, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ rstd, const scalar_t* __restrict__ after,
                                      scalar_t* __restrict__ dx, MergeGeometry g) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= g.rows()) return;
  const int64_t n = 4 * g.c;
  const acc_t mu = mean[row], rs = rstd[row];
  const scalar_t* grow = dy + row * n;
  acc_t a = 0, bsum = 0;
  for (int64_t k = lane; k < n; k += 32) {
    const acc_t gw = static_cast<acc_t>(grow[k]) * w[k];
    a += gw;
    bsum += gw * (gather<scalar_t, acc_t>(x, g, row, k) - mu) * rs;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_xor_sync(0xffffffff, a, offset);
    bsum += __shfl_xor_sync(0xffffffff, bsum, offset);
  }
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t k = lane; k < n; k += 32) {
    const int64_t src = merge_source(g, row, k);
    if (src < 0) continue;
    const acc_t xhat = (static_cast<acc_t>(x[src]) - mu) * rs;
    const acc_t extra = after == nullptr ? acc_t(0) : static_cast<acc_t>(after[src]);
    dx[src] = static_cast<scalar_t>(rs * (static_cast<acc_t>(grow[k]) * w[k] - (a + xhat * bsum) * inv_n) + extra);
  }
}

// Block: 32 entries of the 4C row x 8 row lanes; block (tile, chunk) sums rows of its chunk.
template <typename scalar_t, typename acc_t>
__global__ void backward_params_partial_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                               const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                               acc_t* __restrict__ part_w, acc_t* __restrict__ part_b,
                                               MergeGeometry g, int64_t chunk) {
  __shared__ acc_t sw[8][32];
  __shared__ acc_t sb[8][32];
  const int64_t n = 4 * g.c;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t stop = min(g.rows(), start + chunk);
  acc_t aw = 0, ab = 0;
  if (k < n) {
    for (int64_t row = start + threadIdx.y; row < stop; row += 8) {
      const acc_t gv = static_cast<acc_t>(dy[row * n + k]);
      aw += gv * (gather<scalar_t, acc_t>(x, g, row, k) - mean[row]) * rstd[row];
      ab += gv;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && k < n) {
    acc_t tw = 0, tb = 0;
    for (int i = 0; i < 8; ++i) {
      tw += sw[i][threadIdx.x];
      tb += sb[i][threadIdx.x];
    }
    part_w[static_cast<int64_t>(blockIdx.y) * n + k] = tw;
    part_b[static_cast<int64_t>(blockIdx.y) * n + k] = tb;
  }
}

unsigned row_blocks(const MergeGeometry& g) {
  const int64_t blocks = ceil_div(g.rows(), kWarpsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "hifuse::patch_merge_norm: tensor too large");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_norm_cuda(
    const at::Tensor& x_in, int64_t H, int64_t W, const at::Tensor& weight, const at::Tensor& bias,
    double eps, std::optional<at::ScalarType> out_dtype) {
  const MergeGeometry g = patch_merge_check(x_in, H, W, weight, bias);
  const auto odt = patch_merge_out_dtype(x_in, out_dtype);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto y = at::empty({g.b, g.h2 * g.w2, 4 * g.c}, x.options().dtype(odt));
  const auto sdt = stat_dtype(x.scalar_type());
  auto mean = at::empty({g.b, g.h2 * g.w2}, x.options().dtype(sdt));
  auto rstd = at::empty_like(mean);
  if (g.rows() == 0 || g.c == 0) return {y, mean, rstd};
  const auto w = weight.to(sdt).contiguous();
  const auto b = bias.to(sdt).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_in_out(x.scalar_type(), odt, "hifuse::patch_merge_norm", [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    using acc_t = at::acc_type<T, true>;
    forward_kernel<T, O, acc_t><<<row_blocks(g), kWarpsPerBlock * 32, 0, stream>>>(
        x.const_data_ptr<T>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), y.mutable_data_ptr<O>(),
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), g, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, int64_t H, int64_t W, const at::Tensor& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& grad_after) {
  const MergeGeometry g = patch_merge_check_backward(grad_out, x_in, H, W, weight);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto after = patch_merge_grad_after(grad_after, x);
  const auto dy = grad_out.to(x.scalar_type()).contiguous();
  const auto mean = mean_in.contiguous();
  const auto rstd = rstd_in.contiguous();
  const int64_t n = 4 * g.c;
  auto dx = at::empty_like(x);
  auto dw = at::empty({n}, weight.options());
  auto db = at::empty_like(dw);
  if (g.rows() == 0 || g.c == 0) return {dx.zero_(), dw.zero_(), db.zero_()};
  const auto sdt = stat_dtype(x.scalar_type());
  const auto w = weight.to(sdt).contiguous();
  const int64_t tiles = ceil_div(n, 32);
  const int64_t chunk = std::max<int64_t>(64, ceil_div(g.rows(), std::max<int64_t>(1, kPartialBlocks / tiles)));
  const int64_t chunks = ceil_div(g.rows(), chunk);
  TORCH_CHECK(chunks < 65536, "hifuse::patch_merge_norm_backward: tensor too large");
  auto part_w = at::empty({chunks, n}, x.options().dtype(sdt));
  auto part_b = at::empty_like(part_w);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hifuse::patch_merge_norm_backward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    backward_input_kernel<scalar_t, acc_t><<<row_blocks(g), kWarpsPerBlock * 32, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
        after ? after->const_data_ptr<scalar_t>() : nullptr, dx.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_params_partial_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks)), dim3(32, 8), 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
            rstd.const_data_ptr<acc_t>(), part_w.mutable_data_ptr<acc_t>(), part_b.mutable_data_ptr<acc_t>(), g,
            chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "hifuse::patch_merge_params", [&] {
      sum_partials_kernel<acc_t, scalar_t><<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(
          part_w.const_data_ptr<acc_t>(), part_b.const_data_ptr<acc_t>(), chunks, n,
          dw.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dw, db};
}

TORCH_LIBRARY_IMPL(hifuse, CUDA, m) {
  m.impl("patch_merge_norm", &patch_merge_norm_cuda);
  m.impl("patch_merge_norm_backward", &patch_merge_norm_backward_cuda);
}

}  // namespace hifuse
