// Helpers shared by the CPU and CUDA implementations of the hifuse ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <string>

namespace hifuse {

// An (N, C, H, W) tensor viewed as (N, C, S = H * W) with its element strides. Only
// the two dense layouts are kept as they are; anything else is copied to NCHW.
struct NCSView {
  at::Tensor t;
  int64_t n, c, s;
  int64_t stride_n, stride_c, stride_s;
  bool channels_last;
  at::MemoryFormat format;
};

inline NCSView as_ncs(const at::Tensor& x) {
  NCSView v;
  v.n = x.size(0);
  v.c = x.size(1);
  v.s = x.size(2) * x.size(3);
  if (x.is_contiguous()) {
    v.t = x;
    v.channels_last = false;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    v.t = x;
    v.channels_last = true;
  } else {
    v.t = x.contiguous();
    v.channels_last = false;
  }
  v.format = v.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  v.stride_n = v.c * v.s;
  v.stride_c = v.channels_last ? 1 : v.s;
  v.stride_s = v.channels_last ? v.c : 1;
  return v;
}

// A tensor with the same logical layout as `v` (same strides), for outputs and
// for incoming gradients, which may be expanded or strided in other ways.
inline at::Tensor like_layout(const at::Tensor& t, const NCSView& v) {
  return t.contiguous(v.format);
}

inline at::ScalarType stat_dtype(at::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls body(Tag<input type>{}, Tag<output type>{}) for x's floating dtype and an
// output dtype that is either x's own or float32 (what promote(x, fp32 weight) gives).
template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, const char* name, F&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in, "hifuse_dispatch_in_out", [&] {
    if (out == in) {
      body(Tag<scalar_t>{}, Tag<scalar_t>{});
    } else {
      TORCH_CHECK(out == at::kFloat, name, ": unsupported output dtype ", out);
      body(Tag<scalar_t>{}, Tag<float>{});
    }
  });
}

}  // namespace hifuse
