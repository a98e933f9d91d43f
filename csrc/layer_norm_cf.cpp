// Channels-first LayerNorm, plain and over a concatenation: schemas, argument checks
// and the CPU implementation.
//
// hifuse::layer_norm_cf normalises one (N, C, H, W) tensor over C; hifuse::layer_norm_cat
// normalises the concatenation of up to three such tensors along C without building it
// (its output is the normalised concatenation; its backward returns one gradient per
// part). Both run the same kernels, a plain tensor being a one-part concatenation.
//
// The CPU version works on blocks of positions so that both NCHW (positions
// contiguous) and channels-last (channels contiguous) inputs are read through
// the same strided loops; it accumulates in double, so it is also the float64
// reference path.
#include "layer_norm_cf.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace hifuse {

namespace {

constexpr int64_t kBlock = 64;

template <typename T>
inline double ld(const T* p, int64_t i) {
  return static_cast<double>(p[i]);
}

void check_4d(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
}

void check_parts(const char* op, at::TensorList parts) {
  TORCH_CHECK(!parts.empty() && parts.size() <= static_cast<size_t>(kMaxParts), op, ": takes 1 to ",
              kMaxParts, " tensors, got ", parts.size());
  const auto& x = parts[0];
  for (const auto& t : parts) {
    check_4d(op, t, "every input");
    TORCH_CHECK(t.size(0) == x.size(0) && t.size(2) == x.size(2) && t.size(3) == x.size(3), op,
                ": inputs must share N, H and W, got ", x.sizes(), " and ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": inputs must share a dtype, got ",
                x.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": inputs must be on one device, got ", x.device(),
                " and ", t.device());
    TORCH_CHECK(t.size(1) > 0, op, ": an input has no channels");
  }
}

int64_t total_channels(at::TensorList parts) {
  int64_t c = 0;
  for (const auto& t : parts) c += t.size(1);
  return c;
}

}  // namespace

at::ScalarType layer_norm_check(const char* op, at::TensorList parts, const at::Tensor& weight,
                                const at::Tensor& bias) {
  check_parts(op, parts);
  const auto& x = parts[0];
  const int64_t c = total_channels(parts);
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && bias.dim() == 1 && weight.size(0) == c && bias.size(0) == c, op,
              ": weight and bias must be 1-D with C = ", c, " entries, got ", weight.sizes(), " and ",
              bias.sizes());
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(), op,
              ": x, weight and bias must be on one device, got ", x.device(), ", ", weight.device(),
              ", ", bias.device());
  TORCH_CHECK(weight.scalar_type() == bias.scalar_type() && is_supported_float(weight.scalar_type()),
              op, ": weight and bias must share a floating dtype, got ", weight.scalar_type(), " and ",
              bias.scalar_type());
  const auto out = at::promote_types(x.scalar_type(), weight.scalar_type());
  TORCH_CHECK(out == x.scalar_type() || out == at::kFloat, op, ": x of dtype ", x.scalar_type(),
              " with weight of dtype ", weight.scalar_type(), " is not supported (the result would be ",
              out, ")");
  return out;
}

void layer_norm_check_backward(const char* op, const at::Tensor& grad_out, at::TensorList parts,
                               const at::Tensor& weight, const at::Tensor& mean,
                               const at::Tensor& rstd) {
  check_parts(op, parts);
  const auto& x = parts[0];
  const int64_t c = total_channels(parts);
  const std::vector<int64_t> full{x.size(0), c, x.size(2), x.size(3)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(full), op, ": grad_out must be ",
              at::IntArrayRef(full), ", got ", grad_out.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == c, op, ": weight must have C = ", c, " entries");
  const std::vector<int64_t> stat_shape{x.size(0), x.size(2), x.size(3)};
  TORCH_CHECK(mean.sizes() == at::IntArrayRef(stat_shape) && rstd.sizes() == at::IntArrayRef(stat_shape),
              op, ": mean and rstd must be (N, H, W) = ", at::IntArrayRef(stat_shape), ", got ",
              mean.sizes(), " and ", rstd.sizes());
  TORCH_CHECK(mean.scalar_type() == stat_dtype(x.scalar_type()) && rstd.scalar_type() == mean.scalar_type(),
              op, ": mean and rstd must be ", stat_dtype(x.scalar_type()));
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() || grad_out.scalar_type() == at::kFloat, op,
              ": grad_out must be ", x.scalar_type(), " or float32, got ", grad_out.scalar_type());
  for (const auto* t : {&grad_out, &weight, &mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device());
  }
}

namespace {

// Offsets of one block of positions [p0, p0 + len) within one image: element j of
// channel c of part k sits at base(k) + c_local * stride_c + j * step(k).
struct BlockAddr {
  const CatLayout& L;
  int64_t p0;
  int64_t base(int k) const { return L.row_base(p0, L.width(k)); }
  int64_t step(int k) const { return L.channels_last ? L.width(k) : 1; }
  int64_t out_base() const { return L.row_base(p0, L.c); }
  int64_t out_step() const { return L.channels_last ? L.c : 1; }
};

template <typename scalar_t, typename out_t, typename stat_t>
void forward_cpu(const CatLayout& L, PartPtrs<const scalar_t> x, const double* w, const double* b,
                 out_t* y, stat_t* mean_out, stat_t* rstd_out, double eps) {
  const int64_t C = L.c, S = L.s, sc = L.stride_c();
  const int64_t blocks = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, L.n * blocks, 1, [&](int64_t begin, int64_t end) {
    double mean[kBlock], rstd[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, s0 = (i % blocks) * kBlock;
      const int64_t len = std::min(kBlock, S - s0);
      const BlockAddr at{L, n * S + s0};
      std::fill(mean, mean + len, 0.0);
      std::fill(rstd, rstd + len, 0.0);
      for (int k = 0; k < L.num; ++k) {
        const int64_t base = at.base(k), step = at.step(k);
        for (int64_t cc = 0; cc < L.width(k); ++cc) {
          for (int64_t j = 0; j < len; ++j) mean[j] += ld(x.p[k], base + cc * sc + j * step);
        }
      }
      for (int64_t j = 0; j < len; ++j) mean[j] /= C;
      for (int k = 0; k < L.num; ++k) {
        const int64_t base = at.base(k), step = at.step(k);
        for (int64_t cc = 0; cc < L.width(k); ++cc) {
          for (int64_t j = 0; j < len; ++j) {
            const double d = ld(x.p[k], base + cc * sc + j * step) - mean[j];
            rstd[j] += d * d;
          }
        }
      }
      for (int64_t j = 0; j < len; ++j) rstd[j] = 1.0 / std::sqrt(rstd[j] / C + eps);
      const int64_t obase = at.out_base(), ostep = at.out_step();
      for (int k = 0; k < L.num; ++k) {
        const int64_t base = at.base(k), step = at.step(k);
        for (int64_t cc = 0; cc < L.width(k); ++cc) {
          const int64_t c = L.start[k] + cc;
          for (int64_t j = 0; j < len; ++j) {
            const double v = ld(x.p[k], base + cc * sc + j * step);
            y[obase + c * sc + j * ostep] = static_cast<out_t>((v - mean[j]) * rstd[j] * w[c] + b[c]);
          }
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        mean_out[n * S + s0 + j] = static_cast<stat_t>(mean[j]);
        rstd_out[n * S + s0 + j] = static_cast<stat_t>(rstd[j]);
      }
    }
  });
}

template <typename scalar_t, typename out_t, typename stat_t>
void backward_cpu(const CatLayout& L, const out_t* dy, PartPtrs<const scalar_t> x, const double* w,
                  const stat_t* mean, const stat_t* rstd, PartPtrs<scalar_t> dx, double* dw,
                  double* db) {
  const int64_t C = L.c, S = L.s, sc = L.stride_c();
  const int64_t blocks = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, L.n * blocks, 1, [&](int64_t begin, int64_t end) {
    double a[kBlock], bsum[kBlock], mu[kBlock], rs[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, s0 = (i % blocks) * kBlock;
      const int64_t len = std::min(kBlock, S - s0);
      const BlockAddr at{L, n * S + s0};
      const int64_t obase = at.out_base(), ostep = at.out_step();
      for (int64_t j = 0; j < len; ++j) {
        a[j] = bsum[j] = 0.0;
        mu[j] = static_cast<double>(mean[n * S + s0 + j]);
        rs[j] = static_cast<double>(rstd[n * S + s0 + j]);
      }
      for (int k = 0; k < L.num; ++k) {
        const int64_t base = at.base(k), step = at.step(k);
        for (int64_t cc = 0; cc < L.width(k); ++cc) {
          const int64_t c = L.start[k] + cc;
          for (int64_t j = 0; j < len; ++j) {
            const double g = ld(dy, obase + c * sc + j * ostep) * w[c];
            a[j] += g;
            bsum[j] += g * (ld(x.p[k], base + cc * sc + j * step) - mu[j]) * rs[j];
          }
        }
      }
      for (int k = 0; k < L.num; ++k) {
        const int64_t base = at.base(k), step = at.step(k);
        for (int64_t cc = 0; cc < L.width(k); ++cc) {
          const int64_t c = L.start[k] + cc;
          for (int64_t j = 0; j < len; ++j) {
            const int64_t o = base + cc * sc + j * step;
            const double xhat = (ld(x.p[k], o) - mu[j]) * rs[j];
            const double g = ld(dy, obase + c * sc + j * ostep) * w[c];
            dx.p[k][o] = static_cast<scalar_t>(rs[j] * (g - (a[j] + xhat * bsum[j]) / C));
          }
        }
      }
    }
  });
  // One channel per task keeps the weight and bias sums in a fixed order.
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int k = L.part_from(0, c);
      const int64_t cc = c - L.start[k];
      double sw = 0.0, sb = 0.0;
      for (int64_t p = 0; p < L.n * S; ++p) {
        const double g = ld(dy, L.row_base(p, C) + c * sc);
        const double v = ld(x.p[k], L.row_base(p, L.width(k)) + cc * sc);
        sw += g * (v - static_cast<double>(mean[p])) * static_cast<double>(rstd[p]);
        sb += g;
      }
      dw[c] = sw;
      db[c] = sb;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cat_cpu_impl(
    const CatView& v, at::ScalarType out_dtype, const at::Tensor& weight, const at::Tensor& bias,
    double eps) {
  const auto& x = v.parts[0];
  auto y = at::empty(v.sizes, x.options().dtype(out_dtype).memory_format(v.format));
  const auto sdt = stat_dtype(x.scalar_type());
  auto mean = at::empty({v.L.n, x.size(2), x.size(3)}, x.options().dtype(sdt));
  auto rstd = at::empty_like(mean);
  const auto w = weight.to(at::kDouble).contiguous();
  const auto b = bias.to(at::kDouble).contiguous();
  dispatch_in_out(x.scalar_type(), out_dtype, "hifuse::layer_norm_cf", [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    const auto xs = const_ptrs<T>(v.parts);
    if (sdt == at::kDouble) {
      forward_cpu<T, O, double>(v.L, xs, w.const_data_ptr<double>(), b.const_data_ptr<double>(),
                                y.mutable_data_ptr<O>(), mean.mutable_data_ptr<double>(),
                                rstd.mutable_data_ptr<double>(), eps);
    } else {
      forward_cpu<T, O, float>(v.L, xs, w.const_data_ptr<double>(), b.const_data_ptr<double>(),
                               y.mutable_data_ptr<O>(), mean.mutable_data_ptr<float>(),
                               rstd.mutable_data_ptr<float>(), eps);
    }
  });
  return {y, mean, rstd};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> layer_norm_cat_backward_cpu_impl(
    const at::Tensor& grad_out, const CatView& v, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd) {
  const auto dy = grad_out.contiguous(v.format);
  const auto mean_c = mean.contiguous();
  const auto rstd_c = rstd.contiguous();
  std::vector<at::Tensor> dx;
  for (const auto& t : v.parts) dx.push_back(at::empty(t.sizes(), t.options().memory_format(v.format)));
  auto dw = at::empty({v.L.c}, weight.options().dtype(at::kDouble));
  auto db = at::empty_like(dw);
  const auto w = weight.to(at::kDouble).contiguous();
  const auto sdt = stat_dtype(v.parts[0].scalar_type());
  dispatch_in_out(v.parts[0].scalar_type(), dy.scalar_type(), "hifuse::layer_norm_cf_backward",
                  [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    const auto xs = const_ptrs<T>(v.parts);
    const auto dxs = mutable_ptrs<T>(dx);
    if (sdt == at::kDouble) {
      backward_cpu<T, O, double>(v.L, dy.const_data_ptr<O>(), xs, w.const_data_ptr<double>(),
                                 mean_c.const_data_ptr<double>(), rstd_c.const_data_ptr<double>(), dxs,
                                 dw.mutable_data_ptr<double>(), db.mutable_data_ptr<double>());
    } else {
      backward_cpu<T, O, float>(v.L, dy.const_data_ptr<O>(), xs, w.const_data_ptr<double>(),
                                mean_c.const_data_ptr<float>(), rstd_c.const_data_ptr<float>(), dxs,
                                dw.mutable_data_ptr<double>(), db.mutable_data_ptr<double>());
    }
  });
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(hifuse, m) {
  m.def("layer_norm_cf(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_cf_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      // out_dtype is required: an optional argument left None breaks torch 2.11's autograd of
      // ops with a Tensor[] input
      "layer_norm_cat(Tensor[] parts, Tensor weight, Tensor bias, float eps, ScalarType out_dtype)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_cat_backward(Tensor grad_out, Tensor[] parts, Tensor weight, Tensor mean, Tensor rstd)"
      " -> (Tensor[], Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hifuse, CPU, m) {
  m.impl("layer_norm_cf", &layer_norm_cf_op<&layer_norm_cat_cpu_impl>);
  m.impl("layer_norm_cf_backward", &layer_norm_cf_backward_op<&layer_norm_cat_backward_cpu_impl>);
  m.impl("layer_norm_cat", &layer_norm_cat_op<&layer_norm_cat_cpu_impl>);
  m.impl("layer_norm_cat_backward", &layer_norm_cat_backward_op<&layer_norm_cat_backward_cpu_impl>);
}

}  // namespace hifuse
