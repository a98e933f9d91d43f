// Channels-first LayerNorm: schema, argument checks and the CPU implementation.
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

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "hifuse::layer_norm_cf: ", name, " must be 4-D (N, C, H, W), got ",
              t.dim(), "-D with shape ", t.sizes());
}

}  // namespace

at::ScalarType layer_norm_cf_check(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias) {
  check_4d(x, "x");
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "hifuse::layer_norm_cf: x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && bias.dim() == 1 && weight.size(0) == x.size(1) &&
                  bias.size(0) == x.size(1),
              "hifuse::layer_norm_cf: weight and bias must be 1-D with C = ", x.size(1),
              " entries, got ", weight.sizes(), " and ", bias.sizes());
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(),
              "hifuse::layer_norm_cf: x, weight and bias must be on one device, got ", x.device(),
              ", ", weight.device(), ", ", bias.device());
  TORCH_CHECK(weight.scalar_type() == bias.scalar_type() &&
                  is_supported_float(weight.scalar_type()),
              "hifuse::layer_norm_cf: weight and bias must share a floating dtype, got ",
              weight.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK(x.size(1) > 0, "hifuse::layer_norm_cf: x has no channels");
  const auto out = at::promote_types(x.scalar_type(), weight.scalar_type());
  TORCH_CHECK(out == x.scalar_type() || out == at::kFloat,
              "hifuse::layer_norm_cf: x of dtype ", x.scalar_type(), " with weight of dtype ",
              weight.scalar_type(), " is not supported (the result would be ", out, ")");
  return out;
}

void layer_norm_cf_check_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& mean,
                                  const at::Tensor& rstd) {
  check_4d(x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "hifuse::layer_norm_cf_backward: grad_out shape ",
              grad_out.sizes(), " differs from x shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1),
              "hifuse::layer_norm_cf_backward: weight must have C = ", x.size(1), " entries");
  const std::vector<int64_t> stat_shape{x.size(0), x.size(2), x.size(3)};
  TORCH_CHECK(mean.sizes() == at::IntArrayRef(stat_shape) &&
                  rstd.sizes() == at::IntArrayRef(stat_shape),
              "hifuse::layer_norm_cf_backward: mean and rstd must be (N, H, W) = ",
              at::IntArrayRef(stat_shape), ", got ", mean.sizes(), " and ", rstd.sizes());
  TORCH_CHECK(mean.scalar_type() == stat_dtype(x.scalar_type()) &&
                  rstd.scalar_type() == mean.scalar_type(),
              "hifuse::layer_norm_cf_backward: mean and rstd must be ",
              stat_dtype(x.scalar_type()));
  for (const auto* t : {&grad_out, &weight, &mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device(),
                "hifuse::layer_norm_cf_backward: all tensors must be on ", x.device());
  }
}

namespace {

template <typename scalar_t, typename out_t, typename stat_t>
void forward_cpu(const NCSView& v, const double* w, const double* b, out_t* y, stat_t* mean_out,
                 stat_t* rstd_out, double eps) {
  const scalar_t* x = v.t.const_data_ptr<scalar_t>();
  const int64_t C = v.c, S = v.s;
  const int64_t blocks = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, v.n * blocks, 1, [&](int64_t begin, int64_t end) {
    double mean[kBlock], rstd[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, s0 = (i % blocks) * kBlock;
      const int64_t len = std::min(kBlock, S - s0);
      const int64_t base = n * v.stride_n + s0 * v.stride_s;
      std::fill(mean, mean + len, 0.0);
      std::fill(rstd, rstd + len, 0.0);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = base + c * v.stride_c;
        for (int64_t j = 0; j < len; ++j) mean[j] += ld(x, off + j * v.stride_s);
      }
      for (int64_t j = 0; j < len; ++j) mean[j] /= C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = base + c * v.stride_c;
        for (int64_t j = 0; j < len; ++j) {
          const double d = ld(x, off + j * v.stride_s) - mean[j];
          rstd[j] += d * d;
        }
      }
      for (int64_t j = 0; j < len; ++j) rstd[j] = 1.0 / std::sqrt(rstd[j] / C + eps);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = base + c * v.stride_c;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t o = off + j * v.stride_s;
          y[o] = static_cast<out_t>((ld(x, o) - mean[j]) * rstd[j] * w[c] + b[c]);
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
void backward_cpu(const NCSView& v, const out_t* dy, const double* w, const stat_t* mean,
                  const stat_t* rstd, scalar_t* dx, double* dw, double* db) {
  const scalar_t* x = v.t.const_data_ptr<scalar_t>();
  const int64_t C = v.c, S = v.s;
  const int64_t blocks = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, v.n * blocks, 1, [&](int64_t begin, int64_t end) {
    double a[kBlock], bsum[kBlock], mu[kBlock], rs[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, s0 = (i % blocks) * kBlock;
      const int64_t len = std::min(kBlock, S - s0);
      const int64_t base = n * v.stride_n + s0 * v.stride_s;
      for (int64_t j = 0; j < len; ++j) {
        a[j] = bsum[j] = 0.0;
        mu[j] = static_cast<double>(mean[n * S + s0 + j]);
        rs[j] = static_cast<double>(rstd[n * S + s0 + j]);
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = base + c * v.stride_c;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t o = off + j * v.stride_s;
          const double g = ld(dy, o) * w[c];
          a[j] += g;
          bsum[j] += g * (ld(x, o) - mu[j]) * rs[j];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = base + c * v.stride_c;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t o = off + j * v.stride_s;
          const double xhat = (ld(x, o) - mu[j]) * rs[j];
          dx[o] = static_cast<scalar_t>(rs[j] * (ld(dy, o) * w[c] - (a[j] + xhat * bsum[j]) / C));
        }
      }
    }
  });
  // One channel per task keeps the weight and bias sums in a fixed order.
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sw = 0.0, sb = 0.0;
      for (int64_t n = 0; n < v.n; ++n) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t o = n * v.stride_n + c * v.stride_c + s * v.stride_s;
          const double g = ld(dy, o);
          sw += g * (ld(x, o) - static_cast<double>(mean[n * S + s])) *
                static_cast<double>(rstd[n * S + s]);
          sb += g;
        }
      }
      dw[c] = sw;
      db[c] = sb;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const auto out_dtype = layer_norm_cf_check(x, weight, bias);
  const NCSView v = as_ncs(x);
  auto y = at::empty(x.sizes(), x.options().dtype(out_dtype).memory_format(v.format));
  const auto sdt = stat_dtype(x.scalar_type());
  auto mean = at::empty({v.n, x.size(2), x.size(3)}, x.options().dtype(sdt));
  auto rstd = at::empty_like(mean);
  const auto w = weight.to(at::kDouble).contiguous();
  const auto b = bias.to(at::kDouble).contiguous();
  dispatch_in_out(x.scalar_type(), out_dtype, "hifuse::layer_norm_cf", [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    if (sdt == at::kDouble) {
      forward_cpu<T, O, double>(v, w.const_data_ptr<double>(), b.const_data_ptr<double>(),
                                y.mutable_data_ptr<O>(), mean.mutable_data_ptr<double>(),
                                rstd.mutable_data_ptr<double>(), eps);
    } else {
      forward_cpu<T, O, float>(v, w.const_data_ptr<double>(), b.const_data_ptr<double>(),
                               y.mutable_data_ptr<O>(), mean.mutable_data_ptr<float>(),
                               rstd.mutable_data_ptr<float>(), eps);
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  layer_norm_cf_check_backward(grad_out, x, weight, mean, rstd);
  const NCSView v = as_ncs(x);
  const auto dy = like_layout(grad_out, v);
  const auto mean_c = mean.contiguous();
  const auto rstd_c = rstd.contiguous();
  auto dx = at::empty(x.sizes(), x.options().memory_format(v.format));
  auto dw = at::empty({v.c}, weight.options().dtype(at::kDouble));
  auto db = at::empty_like(dw);
  const auto w = weight.to(at::kDouble).contiguous();
  const auto sdt = stat_dtype(x.scalar_type());
  dispatch_in_out(x.scalar_type(), dy.scalar_type(), "hifuse::layer_norm_cf_backward",
                  [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
                    if (sdt == at::kDouble) {
                      backward_cpu<T, O, double>(v, dy.const_data_ptr<O>(), w.const_data_ptr<double>(),
                                                 mean_c.const_data_ptr<double>(),
                                                 rstd_c.const_data_ptr<double>(),
                                                 dx.mutable_data_ptr<T>(), dw.mutable_data_ptr<double>(),
                                                 db.mutable_data_ptr<double>());
                    } else {
                      backward_cpu<T, O, float>(v, dy.const_data_ptr<O>(), w.const_data_ptr<double>(),
                                                mean_c.const_data_ptr<float>(),
                                                rstd_c.const_data_ptr<float>(),
                                                dx.mutable_data_ptr<T>(), dw.mutable_data_ptr<double>(),
                                                db.mutable_data_ptr<double>());
                    }
                  });
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(hifuse, m) {
  m.def("layer_norm_cf(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_cf_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hifuse, CPU, m) {
  m.impl("layer_norm_cf", &layer_norm_cf_cpu);
  m.impl("layer_norm_cf_backward", &layer_norm_cf_backward_cpu);
}

}  // namespace hifuse
