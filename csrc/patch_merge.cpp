// Patch merging gather + LayerNorm: schema, checks and the CPU implementation.
//
// No gathered (B, L/4, 4C) copy of x is made: each output row is gathered, normalised and
// written in one go, and the backward scatters straight into the input gradient (every
// input token belongs to exactly one output slot, so the scatter never collides).
#include "patch_merge.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace hifuse {

MergeGeometry patch_merge_check(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
                                const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 3, "hifuse::patch_merge_norm: x must be (B, H*W, C), got shape ", x.sizes());
  TORCH_CHECK(H > 0 && W > 0 && x.size(1) == H * W, "hifuse::patch_merge_norm: x has ", x.size(1),
              " tokens, not H*W = ", H, "*", W);
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "hifuse::patch_merge_norm: x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  const int64_t c = x.size(2);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == 4 * c && bias.dim() == 1 && bias.size(0) == 4 * c,
              "hifuse::patch_merge_norm: weight and bias must have 4C = ", 4 * c, " entries");
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(),
              "hifuse::patch_merge_norm: x, weight and bias must be on one device");
  return {x.size(0), H, W, c, (H + 1) / 2, (W + 1) / 2};
}

at::ScalarType patch_merge_out_dtype(const at::Tensor& x, std::optional<at::ScalarType> out_dtype) {
  if (!out_dtype.has_value() || *out_dtype == x.scalar_type()) return x.scalar_type();
  TORCH_CHECK(x.scalar_type() == at::kFloat && (*out_dtype == at::kBFloat16 || *out_dtype == at::kHalf),
              "hifuse::patch_merge_norm: out_dtype must be x's dtype, or bfloat16/float16 for float32 x; got ",
              *out_dtype, " for ", x.scalar_type());
  return *out_dtype;
}

MergeGeometry patch_merge_check_backward(const at::Tensor& grad_out, const at::Tensor& x, int64_t H,
                                         int64_t W, const at::Tensor& weight) {
  const MergeGeometry g = patch_merge_check(x, H, W, weight, weight);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == g.b && grad_out.size(1) == g.h2 * g.w2 &&
                  grad_out.size(2) == 4 * g.c,
              "hifuse::patch_merge_norm_backward: grad_out shape ", grad_out.sizes(), " does not match");
  return g;
}

std::optional<at::Tensor> patch_merge_grad_after(const std::optional<at::Tensor>& grad_after, const at::Tensor& x) {
  if (!grad_after.has_value() || !grad_after->defined()) return std::nullopt;
  TORCH_CHECK(grad_after->sizes() == x.sizes(), "hifuse::patch_merge_norm_backward: grad_after shape ",
              grad_after->sizes(), " is not x's ", x.sizes());
  TORCH_CHECK(grad_after->device() == x.device(), "hifuse::patch_merge_norm_backward: grad_after is on ",
              grad_after->device(), ", x on ", x.device());
  return grad_after->to(x.scalar_type()).contiguous();
}

namespace {

template <typename scalar_t, typename out_t, typename stat_t>
void forward_cpu(const MergeGeometry& g, const scalar_t* x, const double* w, const double* b,
                 out_t* y, stat_t* mean_out, stat_t* rstd_out, double eps) {
  const int64_t n = 4 * g.c;
  at::parallel_for(0, g.rows(), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> v(n);
    for (int64_t row = begin; row < end; ++row) {
      double sum = 0;
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t base = merge_source(g, row, q * g.c);  // a slot's C channels are contiguous
        for (int64_t ch = 0; ch < g.c; ++ch) {
          const double value = base < 0 ? 0.0 : static_cast<double>(x[base + ch]);
          v[q * g.c + ch] = value;
          sum += value;
        }
      }
      const double mean = sum / n;
      double var = 0;
      for (int64_t k = 0; k < n; ++k) var += (v[k] - mean) * (v[k] - mean);
      const double rstd = 1.0 / std::sqrt(var / n + eps);
      out_t* out = y + row * n;
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<out_t>((v[k] - mean) * rstd * w[k] + b[k]);
      mean_out[row] = static_cast<stat_t>(mean);
      rstd_out[row] = static_cast<stat_t>(rstd);
    }
  });
}

template <typename scalar_t, typename stat_t>
void backward_cpu(const MergeGeometry& g, const scalar_t* dy, const scalar_t* x, const double* w,
                  const stat_t* mean, const stat_t* rstd, const scalar_t* after, scalar_t* dx, double* dw,
                  double* db) {
  const int64_t n = 4 * g.c;
  auto xhat_of = [&](int64_t row, int64_t k) {
    const int64_t src = merge_source(g, row, k);
    const double v = src < 0 ? 0.0 : static_cast<double>(x[src]);
    return (v - static_cast<double>(mean[row])) * static_cast<double>(rstd[row]);
  };
  at::parallel_for(0, g.rows(), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> xhat(n);
    int64_t base[4];
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* grow = dy + row * n;
      const double mu = static_cast<double>(mean[row]), rs = static_cast<double>(rstd[row]);
      for (int64_t q = 0; q < 4; ++q) {
        base[q] = merge_source(g, row, q * g.c);  // a slot's C channels are contiguous
        for (int64_t ch = 0; ch < g.c; ++ch) {
          const double v = base[q] < 0 ? 0.0 : static_cast<double>(x[base[q] + ch]);
          xhat[q * g.c + ch] = (v - mu) * rs;
        }
      }
      double a = 0, bsum = 0;
      for (int64_t k = 0; k < n; ++k) {
        const double gw = static_cast<double>(grow[k]) * w[k];
        a += gw;
        bsum += gw * xhat[k];
      }
      for (int64_t q = 0; q < 4; ++q) {
        if (base[q] < 0) continue;
        for (int64_t ch = 0; ch < g.c; ++ch) {
          const int64_t k = q * g.c + ch;
          const double gw = static_cast<double>(grow[k]) * w[k];
          const double extra = after == nullptr ? 0.0 : static_cast<double>(after[base[q] + ch]);
          dx[base[q] + ch] = static_cast<scalar_t>(rs * (gw - (a + xhat[k] * bsum) / n) + extra);
        }
      }
    }
  });
  // One entry per task: the sums over rows run in a fixed order.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double sw = 0, sb = 0;
      for (int64_t row = 0; row < g.rows(); ++row) {
        const double gv = static_cast<double>(dy[row * n + k]);
        sw += gv * xhat_of(row, k);
        sb += gv;
      }
      dw[k] = sw;
      db[k] = sb;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_norm_cpu(
    const at::Tensor& x_in, int64_t H, int64_t W, const at::Tensor& weight, const at::Tensor& bias,
    double eps, std::optional<at::ScalarType> out_dtype) {
  const MergeGeometry g = patch_merge_check(x_in, H, W, weight, bias);
  const auto odt = patch_merge_out_dtype(x_in, out_dtype);
  const auto x = x_in.contiguous();
  auto y = at::empty({g.b, g.h2 * g.w2, 4 * g.c}, x.options().dtype(odt));
  const auto sdt = stat_dtype(x.scalar_type());
  auto mean = at::empty({g.b, g.h2 * g.w2}, x.options().dtype(sdt));
  auto rstd = at::empty_like(mean);
  const auto w = weight.to(at::kDouble).contiguous();
  const auto b = bias.to(at::kDouble).contiguous();
  dispatch_in_out(x.scalar_type(), odt, "hifuse::patch_merge_norm", [&](auto x_tag, auto out_tag) {
    using T = typename decltype(x_tag)::type;
    using O = typename decltype(out_tag)::type;
    if (sdt == at::kDouble) {
      forward_cpu<T, O, double>(g, x.const_data_ptr<T>(), w.const_data_ptr<double>(), b.const_data_ptr<double>(),
                                y.mutable_data_ptr<O>(), mean.mutable_data_ptr<double>(),
                                rstd.mutable_data_ptr<double>(), eps);
    } else {
      forward_cpu<T, O, float>(g, x.const_data_ptr<T>(), w.const_data_ptr<double>(), b.const_data_ptr<double>(),
                               y.mutable_data_ptr<O>(), mean.mutable_data_ptr<float>(),
                               rstd.mutable_data_ptr<float>(), eps);
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, int64_t H, int64_t W, const at::Tensor& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& grad_after) {
  const MergeGeometry g = patch_merge_check_backward(grad_out, x_in, H, W, weight);
  const auto x = x_in.contiguous();
  const auto dy = grad_out.to(x.scalar_type()).contiguous();
  const auto mean = mean_in.contiguous();
  const auto rstd = rstd_in.contiguous();
  const auto after = patch_merge_grad_after(grad_after, x);
  auto dx = at::empty_like(x);
  auto dw = at::empty({4 * g.c}, weight.options().dtype(at::kDouble));
  auto db = at::empty_like(dw);
  const auto w = weight.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hifuse::patch_merge_norm_backward", [&] {
    if (mean.scalar_type() == at::kDouble) {
      backward_cpu<scalar_t, double>(g, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     w.const_data_ptr<double>(), mean.const_data_ptr<double>(),
                                     rstd.const_data_ptr<double>(),
                                     after ? after->const_data_ptr<scalar_t>() : nullptr,
                                     dx.mutable_data_ptr<scalar_t>(),
                                     dw.mutable_data_ptr<double>(), db.mutable_data_ptr<double>());
    } else {
      backward_cpu<scalar_t, float>(g, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    w.const_data_ptr<double>(), mean.const_data_ptr<float>(),
                                    rstd.const_data_ptr<float>(),
                                    after ? after->const_data_ptr<scalar_t>() : nullptr,
                                    dx.mutable_data_ptr<scalar_t>(),
                                    dw.mutable_data_ptr<double>(), db.mutable_data_ptr<double>());
    }
  });
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(hifuse, m) {
  m.def(
      "patch_merge_norm(Tensor x, int H, int W, Tensor weight, Tensor bias, float eps, ScalarType? out_dtype=None)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "patch_merge_norm_backward(Tensor grad_out, Tensor x, int H, int W, Tensor weight, Tensor mean, "
      "Tensor rstd, Tensor? grad_after=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hifuse, CPU, m) {
  m.impl("patch_merge_norm", &patch_merge_norm_cpu);
  m.impl("patch_merge_norm_backward", &patch_merge_norm_backward_cpu);
}

}  // namespace hifuse
