// Channels-first LayerNorm (plain and over a concatenation), CUDA implementation.
//
// Forward and input gradient: a block of 256 threads covers `tp` positions x `g`
// channel lanes (tp * g = 256). The lane index that varies fastest follows the
// contiguous dimension (positions in NCHW, channels in channels-last), so loads
// coalesce in both layouts, and splitting C over `g` lanes keeps enough threads
// busy when there are few positions and many channels (the 7x7 stage at C=2304).
// Each thread keeps shifted sums (forward) or plain sums (backward) over its
// channels; partials of one position are combined in shared memory in a fixed
// order. Weight and bias gradients are reduced deterministically: fixed position
// chunks write per-chunk partial sums, then a second kernel adds them in order.
// Inputs are read through a CatLayout (up to three parts, one for a plain tensor):
// channel c goes to lane c % lanes whichever part holds it, so the statistics do not
// depend on how the channels are split into parts.
#include "layer_norm_cf.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "partial_sums.cuh"
#include "row_stats.cuh"

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

// Positions per block: channels-contiguous rows take one warp of channel lanes per
// position; otherwise as many positions per block as keep ~4 blocks per SM busy.
inline int positions_per_block(const CatLayout& L) {
  if (L.channels_last) return kThreads / 32;
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

// The position this thread works on.
struct Row {
  Lanes ln;
  int64_t p;
  bool active;
};

__device__ inline Row row_of(const CatLayout& L, int tp) {
  Row r;
  r.ln = lanes_of(tp, L.channels_last);
  r.p = static_cast<int64_t>(blockIdx.x) * tp + r.ln.pos;
  r.active = r.p < L.n * L.s;
  return r;
}

// Calls f(part, channel, offset in the part) for the channels of lane `lane` of `lanes`
// (channel c goes to lane c % lanes), in increasing channel order.
template <typename F>
__device__ inline void each_lane_channel(const CatLayout& L, int64_t p, int lane, int lanes, F&& f) {
  const int64_t sc = L.stride_c();
  for (int k = 0; k < L.num; ++k) {
    const int64_t base = L.row_base(p, L.width(k));
    const int64_t r = L.start[k] % lanes;
    for (int64_t c = L.start[k] + ((lane - r) % lanes + lanes) % lanes; c < L.start[k + 1]; c += lanes) {
      f(k, c, base + (c - L.start[k]) * sc);
    }
  }
}

// Channels handled by lane `lane` of `lanes` when channel c goes to lane c % lanes.
__device__ inline int64_t lane_count(int64_t C, int lane, int lanes) {
  return lane < C ? (C - lane + lanes - 1) / lanes : 0;
}

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void forward_kernel(PartPtrs<const scalar_t> x, const acc_t* __restrict__ w,
                               const acc_t* __restrict__ b, out_t* __restrict__ y,
                               acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out,
                               CatLayout L, acc_t eps, int tp) {
  __shared__ acc_t s_mean[kThreads];
  __shared__ acc_t s_m2[kThreads];
  const Row row = row_of(L, tp);
  const Lanes ln = row.ln;
  const int64_t p = row.p;
  const bool active = row.active;

  acc_t mean = 0, m2 = 0;
  if (active) {
    ShiftedSums<acc_t> sums;
    each_lane_channel(L, p, ln.chan, ln.chan_lanes,
                      [&](int k, int64_t, int64_t o) { sums.add(static_cast<acc_t>(x.p[k][o])); });
    sums.finish(mean, m2);
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
  const int64_t obase = L.row_base(p, L.c), sc = L.stride_c();
  each_lane_channel(L, p, ln.chan, ln.chan_lanes, [&](int k, int64_t c, int64_t o) {
    y[obase + c * sc] = static_cast<out_t>((static_cast<acc_t>(x.p[k][o]) - mean) * rstd * w[c] + b[c]);
  });
}

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void backward_input_kernel(const out_t* __restrict__ dy, PartPtrs<const scalar_t> x,
                                      const acc_t* __restrict__ w, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ rstd, PartPtrs<scalar_t> dx,
                                      CatLayout L, int tp) {
  __shared__ acc_t s_a[kThreads];
  __shared__ acc_t s_b[kThreads];
  const Row row = row_of(L, tp);
  const Lanes ln = row.ln;
  const int64_t p = row.p;
  const bool active = row.active;
  const acc_t mu = active ? mean[p] : acc_t(0);
  const acc_t rs = active ? rstd[p] : acc_t(0);
  const int64_t obase = active ? L.row_base(p, L.c) : 0, sc = L.stride_c();

  acc_t a = 0, bsum = 0;
  if (active) {
    each_lane_channel(L, p, ln.chan, ln.chan_lanes, [&](int k, int64_t c, int64_t o) {
      const acc_t g = static_cast<acc_t>(dy[obase + c * sc]) * w[c];
      a += g;
      bsum += g * (static_cast<acc_t>(x.p[k][o]) - mu) * rs;
    });
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
  each_lane_channel(L, p, ln.chan, ln.chan_lanes, [&](int k, int64_t c, int64_t o) {
    const acc_t xhat = (static_cast<acc_t>(x.p[k][o]) - mu) * rs;
    const acc_t g = static_cast<acc_t>(dy[obase + c * sc]) * w[c];
    dx.p[k][o] = static_cast<scalar_t>(rs * (g - (a + xhat * bsum) * inv_c));
  });
}

// Block = 256 threads covering tile_c channels x (256 / tile_c) position lanes, the
// fastest lane along the contiguous dimension.
template <typename scalar_t, typename out_t, typename acc_t>
__global__ void backward_params_partial_kernel(const out_t* __restrict__ dy, PartPtrs<const scalar_t> x,
                                               const acc_t* __restrict__ mean,
                                               const acc_t* __restrict__ rstd,
                                               acc_t* __restrict__ part_w, acc_t* __restrict__ part_b,
                                               CatLayout L, int64_t chunk, int tile_c) {
  __shared__ acc_t sw[kThreads];
  __shared__ acc_t sb[kThreads];
  const bool chan_fast = L.channels_last;
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
    const int k = L.part_from(0, c);
    const int64_t ck = L.width(k), sc = L.stride_c();
    const int64_t xc = (c - L.start[k]) * sc, yc = c * sc;
    for (int64_t p = start + lane_p; p < stop; p += lanes_p) {
      const acc_t g = static_cast<acc_t>(dy[L.row_base(p, L.c) + yc]);
      aw += g * (static_cast<acc_t>(x.p[k][L.row_base(p, ck) + xc]) - mean[p]) * rstd[p];
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

unsigned position_blocks(const CatLayout& L, int tp) {
  const int64_t blocks = ceil_div(L.n * L.s, tp);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "hifuse::layer_norm_cf: tensor too large");
  return static_cast<unsigned>(blocks);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cat_cuda_impl(
    const CatView& v, at::ScalarType out_dtype, const at::Tensor& weight, const at::Tensor& bias,
    double eps) {
  const auto& x = v.parts[0];
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty(v.sizes, x.options().dtype(out_dtype).memory_format(v.format));
  const auto sdt = stat_dtype(x.scalar_type());
  auto mean = at::empty({v.L.n, x.size(2), x.size(3)}, x.options().dtype(sdt));
  auto rstd = at::empty_like(mean);
  if (y.numel() == 0) return {y, mean, rstd};
  const auto w = weight.to(sdt).contiguous();
  const auto b = bias.to(sdt).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const CatLayout& L = v.L;
  const int tp = positions_per_block(L);
  dispatch_in_out(x.scalar_type(), out_dtype, "hifuse::layer_norm_cf", [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    using acc_t = at::acc_type<T, true>;
    forward_kernel<T, O, acc_t><<<position_blocks(L, tp), kThreads, 0, stream>>>(
        const_ptrs<T>(v.parts), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        y.mutable_data_ptr<O>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), L,
        static_cast<acc_t>(eps), tp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> layer_norm_cat_backward_cuda_impl(
    const at::Tensor& grad_out, const CatView& v, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd) {
  const auto& x = v.parts[0];
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dy = grad_out.contiguous(v.format);
  const auto mean_c = mean.contiguous();
  const auto rstd_c = rstd.contiguous();
  const auto sdt = stat_dtype(x.scalar_type());
  std::vector<at::Tensor> dx;
  for (const auto& t : v.parts) dx.push_back(at::empty(t.sizes(), t.options().memory_format(v.format)));
  auto dw = at::empty({v.L.c}, weight.options());
  auto db = at::empty_like(dw);
  const CatLayout& L = v.L;
  const int64_t positions = L.n * L.s;
  if (positions == 0) return {dx, dw.zero_(), db.zero_()};
  const auto w = weight.to(sdt).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int tp = positions_per_block(L);

  const int tile_c = L.channels_last ? 32 : 8;
  const int64_t c_tiles = ceil_div(L.c, tile_c);
  const int64_t chunk = std::max<int64_t>(kThreads, ceil_div(positions, std::max<int64_t>(1, kPartialBlocks / c_tiles)));
  const int64_t chunks = ceil_div(positions, chunk);
  TORCH_CHECK(chunks < 65536 && c_tiles <= std::numeric_limits<int32_t>::max(),
              "hifuse::layer_norm_cf_backward: tensor too large");
  auto part_w = at::empty({chunks, L.c}, x.options().dtype(sdt));
  auto part_b = at::empty_like(part_w);

  dispatch_in_out(x.scalar_type(), dy.scalar_type(), "hifuse::layer_norm_cf_backward",
                  [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    using acc_t = at::acc_type<T, true>;
    const auto xs = const_ptrs<T>(v.parts);
    backward_input_kernel<T, O, acc_t><<<position_blocks(L, tp), kThreads, 0, stream>>>(
        dy.const_data_ptr<O>(), xs, w.const_data_ptr<acc_t>(), mean_c.const_data_ptr<acc_t>(),
        rstd_c.const_data_ptr<acc_t>(), mutable_ptrs<T>(dx), L, tp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(c_tiles), static_cast<unsigned>(chunks));
    backward_params_partial_kernel<T, O, acc_t><<<grid, kThreads, 0, stream>>>(
        dy.const_data_ptr<O>(), xs, mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(),
        part_w.mutable_data_ptr<acc_t>(), part_b.mutable_data_ptr<acc_t>(), L, chunk, tile_c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                    "hifuse::layer_norm_cf_backward_params", [&] {
      sum_partials_kernel<acc_t, scalar_t>
          <<<static_cast<unsigned>(ceil_div(L.c, kThreads)), kThreads, 0, stream>>>(
              part_w.const_data_ptr<acc_t>(), part_b.const_data_ptr<acc_t>(), chunks, L.c,
              dw.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dw, db};
}

TORCH_LIBRARY_IMPL(hifuse, CUDA, m) {
  m.impl("layer_norm_cf", &layer_norm_cf_op<&layer_norm_cat_cuda_impl>);
  m.impl("layer_norm_cf_backward", &layer_norm_cf_backward_op<&layer_norm_cat_backward_cuda_impl>);
  m.impl("layer_norm_cat", &layer_norm_cat_op<&layer_norm_cat_cuda_impl>);
  m.impl("layer_norm_cat_backward", &layer_norm_cat_backward_op<&layer_norm_cat_backward_cuda_impl>);
}

}  // namespace hifuse
