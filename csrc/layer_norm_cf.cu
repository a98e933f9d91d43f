// Channels-first LayerNorm, CUDA implementation.
//
// Forward and input gradient: a block of 256 threads covers `tp` positions x `g`
// channel lanes (tp * g = 256). The lane index that varies fastest follows the
// contiguous dimension (positions in NCHW, channels in channels-last), so loads
// coalesce in both layouts, and splitting C over `g` lanes keeps enough threads
// busy when there are few positions and many channels (the 7x7 stage at C=2304).
// Each thread keeps a Welford (forward) or plain (backward) partial over its
// channels; partials of one position are combined in shared memory in a fixed
// order. Weight and bias gradients are reduced deterministically: fixed position
// chunks write per-chunk partial sums, then a second kernel adds them in order.
#include "layer_norm_cf.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "partial_sums.cuh"

#include <limits>

namespace hifuse {

namespace {

constexpr int kThreads = 256;
constexpr int kPartialBlocks = 512;  // target number of position chunks x channel tiles

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

struct Layout {
  int64_t n, c, s, stride_n, stride_c, stride_s;
};

inline Layout layout_of(const NCSView& v) {
  return {v.n, v.c, v.s, v.stride_n, v.stride_c, v.stride_s};
}

// Positions per block: channels-contiguous rows take one warp of channel lanes per
// position; otherwise as many positions per block as keep ~4 blocks per SM busy.
inline int positions_per_block(const Layout& L) {
  if (L.stride_c == 1) return kThreads / 32;
  const int64_t positions = L.n * L.s;
  const int64_t want_blocks = 4 * sm_count();
  for (int tp : {32, 16}) {
    if (ceil_div(positions, tp) >= want_blocks) return tp;
  }
  return 8;
}

struct Lanes {
  int pos, chan, chan_lanes;
};

__device__ inline Lanes lanes_of(int tp, bool chan_fast) {
  const int g = blockDim.x / tp;
  const int tid = threadIdx.x;
  return chan_fast ? Lanes{tid / g, tid % g, g} : Lanes{tid % tp, tid / tp, g};
}

// The position this thread works on and where its row starts.
struct Row {
  Lanes ln;
  int64_t p;
  bool active;
  int64_t base;
};

__device__ inline Row row_of(const Layout& L, int tp) {
  Row r;
  r.ln = lanes_of(tp, L.stride_c == 1);
  r.p = static_cast<int64_t>(blockIdx.x) * tp + r.ln.pos;
  r.active = r.p < L.n * L.s;
  r.base = r.active ? (r.p / L.s) * L.stride_n + (r.p % L.s) * L.stride_s : 0;
  return r;
}

// Channels handled by lane `lane` of `lanes` when channel c goes to lane c % lanes.
__device__ inline int64_t lane_count(int64_t C, int lane, int lanes) {
  return lane < C ? (C - lane + lanes - 1) / lanes : 0;
}

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                               const acc_t* __restrict__ b, out_t* __restrict__ y,
                               acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out,
                               Layout L, acc_t eps, int tp) {
  __shared__ acc_t s_mean[kThreads];
  __shared__ acc_t s_m2[kThreads];
  const Row row = row_of(L, tp);
  const Lanes ln = row.ln;
  const int64_t p = row.p, base = row.base;
  const bool active = row.active;

  acc_t mean = 0, m2 = 0;
  if (active) {
    acc_t count = 0;
    for (int64_t c = ln.chan; c < L.c; c += ln.chan_lanes) {
      const acc_t v = static_cast<acc_t>(x[base + c * L.stride_c]);
      count += 1;
      const acc_t d = v - mean;
      mean += d / count;
      m2 += d * (v - mean);
    }
  }
  const int slot = ln.pos * ln.chan_lanes;
  s_mean[slot + ln.chan] = mean;
  s_m2[slot + ln.chan] = m2;
  __syncthreads();
  if (active && ln.chan == 0) {
    // Chan et al.'s pairwise combination, lanes in order.
    acc_t n_a = 0, mean_a = 0, m2_a = 0;
    for (int g = 0; g < ln.chan_lanes; ++g) {
      const acc_t n_b = static_cast<acc_t>(lane_count(L.c, g, ln.chan_lanes));
      if (n_b == 0) continue;
      const acc_t n_ab = n_a + n_b;
      const acc_t delta = s_mean[slot + g] - mean_a;
      mean_a += delta * n_b / n_ab;
      m2_a += s_m2[slot + g] + delta * delta * n_a * n_b / n_ab;
      n_a = n_ab;
    }
    const acc_t rstd = rsqrt(m2_a / static_cast<acc_t>(L.c) + eps);
    s_mean[slot] = mean_a;
    s_m2[slot] = rstd;
    mean_out[p] = mean_a;
    rstd_out[p] = rstd;
  }
  __syncthreads();
  if (!active) return;
  mean = s_mean[slot];
  const acc_t rstd = s_m2[slot];
  for (int64_t c = ln.chan; c < L.c; c += ln.chan_lanes) {
    const int64_t o = base + c * L.stride_c;
    y[o] = static_cast<out_t>((static_cast<acc_t>(x[o]) - mean) * rstd * w[c] + b[c]);
  }
}

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void backward_input_kernel(const out_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const acc_t* __restrict__ w, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ rstd, scalar_t* __restrict__ dx,
                                      Layout L, int tp) {
  __shared__ acc_t s_a[kThreads];
  __shared__ acc_t s_b[kThreads];
  const Row row = row_of(L, tp);
  const Lanes ln = row.ln;
  const int64_t p = row.p, base = row.base;
  const bool active = row.active;
  const acc_t mu = active ? mean[p] : acc_t(0);
  const acc_t rs = active ? rstd[p] : acc_t(0);

  acc_t a = 0, bsum = 0;
  if (active) {
    for (int64_t c = ln.chan; c < L.c; c += ln.chan_lanes) {
      const int64_t o = base + c * L.stride_c;
      const acc_t g = static_cast<acc_t>(dy[o]) * w[c];
      a += g;
      bsum += g * (static_cast<acc_t>(x[o]) - mu) * rs;
    }
  }
  const int slot = ln.pos * ln.chan_lanes;
  s_a[slot + ln.chan] = a;
  s_b[slot + ln.chan] = bsum;
  __syncthreads();
  if (active && ln.chan == 0) {
    acc_t ta = 0, tb = 0;
    for (int g = 0; g < ln.chan_lanes; ++g) {
      ta += s_a[slot + g];
      tb += s_b[slot + g];
    }
    s_a[slot] = ta;
    s_b[slot] = tb;
  }
  __syncthreads();
  if (!active) return;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(L.c);
  a = s_a[slot];
  bsum = s_b[slot];
  for (int64_t c = ln.chan; c < L.c; c += ln.chan_lanes) {
    const int64_t o = base + c * L.stride_c;
    const acc_t xhat = (static_cast<acc_t>(x[o]) - mu) * rs;
    dx[o] = static_cast<scalar_t>(rs * (static_cast<acc_t>(dy[o]) * w[c] - (a + xhat * bsum) * inv_c));
  }
}

// Block = 256 threads covering tile_c channels x (256 / tile_c) position lanes, the
// fastest lane along the contiguous dimension.
template <typename scalar_t, typename out_t, typename acc_t>
__global__ void backward_params_partial_kernel(const out_t* __restrict__ dy,
                                               const scalar_t* __restrict__ x,
                                               const acc_t* __restrict__ mean,
                                               const acc_t* __restrict__ rstd,
                                               acc_t* __restrict__ part_w, acc_t* __restrict__ part_b,
                                               Layout L, int64_t chunk, int tile_c) {
  __shared__ acc_t sw[kThreads];
  __shared__ acc_t sb[kThreads];
  const bool chan_fast = L.stride_c == 1;
  const int lanes_p = kThreads / tile_c;
  const int tid = threadIdx.x;
  const int lane_c = chan_fast ? tid % tile_c : tid / lanes_p;
  const int lane_p = chan_fast ? tid / tile_c : tid % lanes_p;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * tile_c + lane_c;
  const int64_t positions = L.n * L.s;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t stop = min(positions, start + chunk);
  acc_t aw = 0, ab = 0;
  if (c < L.c) {
    for (int64_t p = start + lane_p; p < stop; p += lanes_p) {
      const int64_t o = (p / L.s) * L.stride_n + c * L.stride_c + (p % L.s) * L.stride_s;
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

unsigned position_blocks(const Layout& L, int tp) {
  const int64_t blocks = ceil_div(L.n * L.s, tp);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "hifuse::layer_norm_cf: tensor too large");
  return static_cast<unsigned>(blocks);
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
  const Layout L = layout_of(v);
  const int tp = positions_per_block(L);
  dispatch_in_out(x.scalar_type(), out_dtype, "hifuse::layer_norm_cf", [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    using acc_t = at::acc_type<T, true>;
    forward_kernel<T, O, acc_t><<<position_blocks(L, tp), kThreads, 0, stream>>>(
        v.t.const_data_ptr<T>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        y.mutable_data_ptr<O>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), L,
        static_cast<acc_t>(eps), tp);
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
  const Layout L = layout_of(v);
  const int tp = positions_per_block(L);

  const int tile_c = L.stride_c == 1 ? 32 : 8;
  const int64_t c_tiles = ceil_div(v.c, tile_c);
  const int64_t chunk = std::max<int64_t>(kThreads, ceil_div(positions, std::max<int64_t>(1, kPartialBlocks / c_tiles)));
  const int64_t chunks = ceil_div(positions, chunk);
  TORCH_CHECK(chunks < 65536 && c_tiles <= std::numeric_limits<int32_t>::max(),
              "hifuse::layer_norm_cf_backward: tensor too large");
  auto part_w = at::empty({chunks, v.c}, x.options().dtype(sdt));
  auto part_b = at::empty_like(part_w);

  dispatch_in_out(x.scalar_type(), dy.scalar_type(), "hifuse::layer_norm_cf_backward",
                  [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    using acc_t = at::acc_type<T, true>;
    backward_input_kernel<T, O, acc_t><<<position_blocks(L, tp), kThreads, 0, stream>>>(
        dy.const_data_ptr<O>(), v.t.const_data_ptr<T>(), w.const_data_ptr<acc_t>(),
        mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(), dx.mutable_data_ptr<T>(), L,
        tp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(c_tiles), static_cast<unsigned>(chunks));
    backward_params_partial_kernel<T, O, acc_t><<<grid, kThreads, 0, stream>>>(
        dy.const_data_ptr<O>(), v.t.const_data_ptr<T>(), mean_c.const_data_ptr<acc_t>(),
        rstd_c.const_data_ptr<acc_t>(), part_w.mutable_data_ptr<acc_t>(),
        part_b.mutable_data_ptr<acc_t>(), L, chunk, tile_c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                    "hifuse::layer_norm_cf_backward_params", [&] {
      sum_partials_kernel<acc_t, scalar_t>
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
