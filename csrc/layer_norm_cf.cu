// Channels-first LayerNorm, CUDA implementation.
//
// Forward and input gradient: one thread per position (n, h, w), looping over C.
// In NCHW neighbouring threads read neighbouring positions, so every load is
// coalesced; in channels-last each thread walks a contiguous row. Statistics use
// Welford in the accumulation type. Weight and bias gradients are reduced
// deterministically: fixed position chunks write per-chunk partial sums, then a
// second kernel adds the chunks in order (no atomics).
#include "layer_norm_cf.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace hifuse {

namespace {

constexpr int kThreads = 256;
constexpr int kPartialBlocks = 512;  // target number of position chunks per channel tile

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

inline unsigned grid_for(int64_t work) {
  const int64_t max_blocks = sm_count() * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(work, kThreads), max_blocks)));
}

struct Layout {
  int64_t n, c, s, stride_n, stride_c, stride_s;
};

inline Layout layout_of(const NCSView& v) {
  return {v.n, v.c, v.s, v.stride_n, v.stride_c, v.stride_s};
}

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                               const acc_t* __restrict__ b, out_t* __restrict__ y,
                               acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out,
                               Layout L, acc_t eps) {
  const int64_t positions = L.n * L.s;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < positions;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / L.s, s = p % L.s;
    const scalar_t* row = x + n * L.stride_n + s * L.stride_s;
    acc_t mean = 0, m2 = 0;
    for (int64_t c = 0; c < L.c; ++c) {
      const acc_t v = static_cast<acc_t>(row[c * L.stride_c]);
      const acc_t d = v - mean;
      mean += d / static_cast<acc_t>(c + 1);
      m2 += d * (v - mean);
    }
    const acc_t rstd = rsqrt(m2 / static_cast<acc_t>(L.c) + eps);
    out_t* out = y + n * L.stride_n + s * L.stride_s;
    for (int64_t c = 0; c < L.c; ++c) {
      const acc_t v = static_cast<acc_t>(row[c * L.stride_c]);
      out[c * L.stride_c] = static_cast<out_t>((v - mean) * rstd * w[c] + b[c]);
    }
    mean_out[p] = mean;
    rstd_out[p] = rstd;
  }
}

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void backward_input_kernel(const out_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const acc_t* __restrict__ w, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ rstd, scalar_t* __restrict__ dx,
                                      Layout L) {
  const int64_t positions = L.n * L.s;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(L.c);
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < positions;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / L.s, s = p % L.s;
    const int64_t base = n * L.stride_n + s * L.stride_s;
    const acc_t mu = mean[p], rs = rstd[p];
    acc_t a = 0, bsum = 0;
    for (int64_t c = 0; c < L.c; ++c) {
      const int64_t o = base + c * L.stride_c;
      const acc_t g = static_cast<acc_t>(dy[o]) * w[c];
      a += g;
      bsum += g * (static_cast<acc_t>(x[o]) - mu) * rs;
    }
    for (int64_t c = 0; c < L.c; ++c) {
      const int64_t o = base + c * L.stride_c;
      const acc_t xhat = (static_cast<acc_t>(x[o]) - mu) * rs;
      dx[o] = static_cast<scalar_t>(rs * (static_cast<acc_t>(dy[o]) * w[c] - (a + xhat * bsum) * inv_c));
    }
  }
}

// Block = 256 threads covering kTileC channels x (256 / kTileC) position lanes. The lane
// that varies fastest follows the contiguous dimension, so loads coalesce in both layouts.
template <typename scalar_t, typename out_t, typename acc_t>
__global__ void backward_params_partial_kernel(const out_t* __restrict__ dy,
                                               const scalar_t* __restrict__ x,
                                               const acc_t* __restrict__ mean,
                                               const acc_t* __restrict__ rstd,
                                               acc_t* __restrict__ part_w, acc_t* __restrict__ part_b,
                                               Layout L, int64_t chunk, int tile_c, bool channels_last) {
  __shared__ acc_t sw[kThreads];
  __shared__ acc_t sb[kThreads];
  const int lanes_p = kThreads / tile_c;
  const int tid = threadIdx.x;
  const int lane_c = channels_last ? tid % tile_c : tid / lanes_p;
  const int lane_p = channels_last ? tid / tile_c : tid % lanes_p;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * tile_c + lane_c;
  const int64_t positions = L.n * L.s;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t stop = min(positions, start + chunk);
  acc_t aw = 0, ab = 0;
  if (c < L.c) {
    for (int64_t p = start + lane_p; p < stop; p += lanes_p) {
      const int64_t n = p / L.s, s = p % L.s;
      const int64_t o = n * L.stride_n + c * L.stride_c + s * L.stride_s;
      const acc_t g = static_cast<acc_t>(dy[o]);
      aw += g * (static_cast<acc_t>(x[o]) - mean[p]) * rstd[p];
      ab += g;
    }
  }
  sw[lane_c * lanes_p + lane_p] = aw;
  sb[lane_c * lanes_p + lane_p] = ab;
  __syncthreads();
  if (lane_p == 0 && c < L.c) {
    acc_t tw = 0, tb = 0;
    for (int i = 0; i < lanes_p; ++i) {
      tw += sw[lane_c * lanes_p + i];
      tb += sb[lane_c * lanes_p + i];
    }
    part_w[static_cast<int64_t>(blockIdx.y) * L.c + c] = tw;
    part_b[static_cast<int64_t>(blockIdx.y) * L.c + c] = tb;
  }
}

template <typename acc_t, typename param_t>
__global__ void backward_params_final_kernel(const acc_t* __restrict__ part_w,
                                             const acc_t* __restrict__ part_b, int64_t chunks,
                                             int64_t C, param_t* __restrict__ dw,
                                             param_t* __restrict__ db) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  acc_t tw = 0, tb = 0;
  for (int64_t i = 0; i < chunks; ++i) {
    tw += part_w[i * C + c];
    tb += part_b[i * C + c];
  }
  dw[c] = static_cast<param_t>(tw);
  db[c] = static_cast<param_t>(tb);
}

template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, const char* name, F&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in, "hifuse_dispatch_in_out", [&] {
    if (out == in) {
      body.template operator()<scalar_t, scalar_t>();
    } else {
      TORCH_CHECK(out == at::kFloat, name, ": unsupported output dtype ", out);
      body.template operator()<scalar_t, float>();
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const auto out_dtype = layer_norm_cf_check(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const NCSView v = as_ncs(x);
  auto y = at::empty(x.sizes(), x.options().dtype(out_dtype).memory_format(v.format));
  const auto sdt = stat_dtype(x.scalar_type());
  auto mean = at::empty({v.n, x.size(2), x.size(3)}, x.options().dtype(sdt));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  const auto w = weight.to(sdt).contiguous();
  const auto b = bias.to(sdt).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = grid_for(v.n * v.s);
  dispatch_in_out(x.scalar_type(), out_dtype, "hifuse::layer_norm_cf", [&]<typename T, typename O>() {
    using acc_t = at::acc_type<T, true>;
    forward_kernel<T, O, acc_t><<<grid, kThreads, 0, stream>>>(
        v.t.const_data_ptr<T>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        y.mutable_data_ptr<O>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
        layout_of(v), static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  layer_norm_cf_check_backward(grad_out, x, weight, mean, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const NCSView v = as_ncs(x);
  const auto dy = like_layout(grad_out, v);
  const auto mean_c = mean.contiguous();
  const auto rstd_c = rstd.contiguous();
  const auto sdt = stat_dtype(x.scalar_type());
  auto dx = at::empty(x.sizes(), x.options().memory_format(v.format));
  auto dw = at::empty({v.c}, weight.options());
  auto db = at::empty_like(dw);
  const int64_t positions = v.n * v.s;
  if (positions == 0) return {dx, dw.zero_(), db.zero_()};
  const auto w = weight.to(sdt).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const int tile_c = v.channels_last ? 32 : 8;
  const int64_t c_tiles = ceil_div(v.c, tile_c);
  const int64_t chunk = std::max<int64_t>(kThreads, ceil_div(positions, std::max<int64_t>(1, kPartialBlocks / c_tiles)));
  const int64_t chunks = ceil_div(positions, chunk);
  TORCH_CHECK(chunks < 65536 && c_tiles < (int64_t{1} << 31), "hifuse::layer_norm_cf_backward: tensor too large");
  auto part_w = at::empty({chunks, v.c}, x.options().dtype(sdt));
  auto part_b = at::empty_like(part_w);

  dispatch_in_out(x.scalar_type(), dy.scalar_type(), "hifuse::layer_norm_cf_backward",
                  [&]<typename T, typename O>() {
    using acc_t = at::acc_type<T, true>;
    backward_input_kernel<T, O, acc_t><<<grid_for(positions), kThreads, 0, stream>>>(
        dy.const_data_ptr<O>(), v.t.const_data_ptr<T>(), w.const_data_ptr<acc_t>(),
        mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(), dx.mutable_data_ptr<T>(),
        layout_of(v));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(c_tiles), static_cast<unsigned>(chunks));
    backward_params_partial_kernel<T, O, acc_t><<<grid, kThreads, 0, stream>>>(
        dy.const_data_ptr<O>(), v.t.const_data_ptr<T>(), mean_c.const_data_ptr<acc_t>(),
        rstd_c.const_data_ptr<acc_t>(), part_w.mutable_data_ptr<acc_t>(),
        part_b.mutable_data_ptr<acc_t>(), layout_of(v), chunk, tile_c, v.channels_last);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                    "hifuse::layer_norm_cf_backward_params", [&] {
      backward_params_final_kernel<acc_t, scalar_t>
          <<<static_cast<unsigned>(ceil_div(v.c, kThreads)), kThreads, 0, stream>>>(
              part_w.const_data_ptr<acc_t>(), part_b.const_data_ptr<acc_t>(), chunks, v.c,
              dw.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dw, db};
}

TORCH_LIBRARY_IMPL(hifuse, CUDA, m) {
  m.impl("layer_norm_cf", &layer_norm_cf_cuda);
  m.impl("layer_norm_cf_backward", &layer_norm_cf_backward_cuda);
}

}  // namespace hifuse
