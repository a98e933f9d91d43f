// Channels-first LayerNorm: normalise (N, C, H, W) over C at every (n, h, w); and the
// same over the concatenation of up to three tensors along C, which is never built.
#pragma once

#include "common.h"

#include <optional>
#include <tuple>
#include <vector>

namespace hifuse {

// Validates the arguments and returns the output dtype: promote(x, weight), which is
// what the eager formula `weight * x_hat + bias` gives, restricted to x's dtype or
// float32. `op` names the op in messages.
at::ScalarType layer_norm_check(const char* op, at::TensorList parts, const at::Tensor& weight,
                                const at::Tensor& bias);

void layer_norm_check_backward(const char* op, const at::Tensor& grad_out, at::TensorList parts,
                               const at::Tensor& weight, const at::Tensor& mean,
                               const at::Tensor& rstd);

// Forward on the concatenation of `v`'s parts: (y, mean, rstd), y of the concatenated shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cat_cpu_impl(
    const CatView& v, at::ScalarType out_dtype, const at::Tensor& weight, const at::Tensor& bias,
    double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cat_cuda_impl(
    const CatView& v, at::ScalarType out_dtype, const at::Tensor& weight, const at::Tensor& bias,
    double eps);

// Backward: (one gradient per part, dweight, dbias).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> layer_norm_cat_backward_cpu_impl(
    const at::Tensor& grad_out, const CatView& v, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> layer_norm_cat_backward_cuda_impl(
    const at::Tensor& grad_out, const CatView& v, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd);

}  // namespace hifuse

namespace hifuse {

// The registered ops, one instantiation per backend implementation.
using CatForward = decltype(&layer_norm_cat_cpu_impl);
using CatBackward = decltype(&layer_norm_cat_backward_cpu_impl);

template <CatForward Impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_op(const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, double eps) {
  const auto out = layer_norm_check("hifuse::layer_norm_cf", {x}, weight, bias);
  return Impl(as_cat({x}), out, weight, bias, eps);
}

template <CatBackward Impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd) {
  layer_norm_check_backward("hifuse::layer_norm_cf_backward", grad_out, {x}, weight, mean, rstd);
  auto [dx, dw, db] = Impl(grad_out, as_cat({x}), weight, mean, rstd);
  return {dx[0], dw, db};
}

template <CatForward Impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cat_op(at::TensorList parts, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double eps,
                                                                 at::ScalarType out_dtype) {
  layer_norm_check("hifuse::layer_norm_cat", parts, weight, bias);
  TORCH_CHECK(out_dtype == parts[0].scalar_type() || out_dtype == at::kFloat,
              "hifuse::layer_norm_cat: out_dtype must be the inputs' dtype or float32, got ", out_dtype);
  return Impl(as_cat(parts), out_dtype, weight, bias, eps);
}

template <CatBackward Impl>
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> layer_norm_cat_backward_op(
    const at::Tensor& grad_out, at::TensorList parts, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd) {
  layer_norm_check_backward("hifuse::layer_norm_cat_backward", grad_out, parts, weight, mean, rstd);
  return Impl(grad_out, as_cat(parts), weight, mean, rstd);
}

}  // namespace hifuse
