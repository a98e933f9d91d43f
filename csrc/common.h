// Helpers shared by the CPU and CUDA implementations of the hifuse ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace hifuse {

#if defined(__CUDACC__)
#define HIFUSE_HD __host__ __device__
#else
#define HIFUSE_HD
#endif

constexpr int kMaxParts = 3;

// Up to kMaxParts (N, C_k, H, W) tensors read as their concatenation along C, an
// (N, C = sum C_k, H, W) tensor that is never built. Positions p = n * S + s (S = H * W).
// All parts share one dense memory format: channels-last when some part is
// channels-last (and not also NCHW-contiguous), NCHW otherwise; parts in any other
// layout are copied to it. A single part is a plain channels-first tensor.
struct CatLayout {
  int64_t n, c, s;
  int num;
  bool channels_last;
  int64_t start[kMaxParts + 1];  // part k holds channels [start[k], start[k + 1])

  HIFUSE_HD int64_t width(int k) const { return start[k + 1] - start[k]; }
  // Stride between channels, the same in every part and in the concatenation.
  HIFUSE_HD int64_t stride_c() const { return channels_last ? 1 : s; }
  // Element offset of (p, channel 0) in a tensor of `ck` channels.
  HIFUSE_HD int64_t row_base(int64_t p, int64_t ck) const {
    return channels_last ? p * ck : (p / s) * ck * s + p % s;
  }
  // The part holding channel c, searching up from part k (channels are visited in order).
  HIFUSE_HD int part_from(int k, int64_t c) const {
    while (k + 1 < num && c >= start[k + 1]) ++k;
    return k;
  }
};

struct CatView {
  std::vector<at::Tensor> parts;  // each dense in `format`
  CatLayout L;
  at::MemoryFormat format;
  std::vector<int64_t> sizes;  // (N, C, H, W) of the concatenation
};

inline CatView as_cat(at::TensorList parts) {
  CatView v;
  TORCH_CHECK(!parts.empty() && parts.size() <= static_cast<size_t>(kMaxParts),
              "hifuse: 1 to ", kMaxParts, " parts are supported, got ", parts.size());
  bool cl = false;
  for (const auto& t : parts) {
    cl = cl || (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast));
  }
  v.format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto& first = parts[0];
  v.L.n = first.size(0);
  v.L.s = first.size(2) * first.size(3);
  v.L.num = static_cast<int>(parts.size());
  v.L.channels_last = cl;
  v.L.start[0] = 0;
  for (int k = 0; k < v.L.num; ++k) {
    v.parts.push_back(parts[k].contiguous(v.format));
    v.L.start[k + 1] = v.L.start[k] + parts[k].size(1);
  }
  for (int k = v.L.num + 1; k <= kMaxParts; ++k) v.L.start[k] = v.L.start[v.L.num];
  v.L.c = v.L.start[v.L.num];
  v.sizes = {v.L.n, v.L.c, first.size(2), first.size(3)};
  return v;
}

// Pointers to the parts' data, passed to kernels by value.
template <typename T>
struct PartPtrs {
  T* p[kMaxParts];
};

template <typename T>
PartPtrs<const T> const_ptrs(const std::vector<at::Tensor>& parts) {
  PartPtrs<const T> r{};
  for (size_t k = 0; k < parts.size(); ++k) r.p[k] = parts[k].const_data_ptr<T>();
  return r;
}

template <typename T>
PartPtrs<T> mutable_ptrs(std::vector<at::Tensor>& parts) {
  PartPtrs<T> r{};
  for (size_t k = 0; k < parts.size(); ++k) r.p[k] = parts[k].mutable_data_ptr<T>();
  return r;
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
// output dtype that is either x's own, float32 (what promote(x, fp32 weight) gives), or
// for float32 input a 16-bit float (a result written in the dtype of the GEMM after it).
template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, const char* name, F&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in, "hifuse_dispatch_in_out", [&] {
    if (out == in) {
      body(Tag<scalar_t>{}, Tag<scalar_t>{});
    } else if (out == at::kFloat) {
      body(Tag<scalar_t>{}, Tag<float>{});
    } else {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (out == at::kBFloat16) return body(Tag<float>{}, Tag<at::BFloat16>{});
        if (out == at::kHalf) return body(Tag<float>{}, Tag<at::Half>{});
      }
      TORCH_CHECK(false, name, ": unsupported output dtype ", out, " for input ", in);
    }
  });
}

}  // namespace hifuse
