// Channels-first LayerNorm: normalise (N, C, H, W) over C at every (n, h, w).
#pragma once

#include "common.h"

#include <tuple>

namespace hifuse {

// Validates the arguments and returns the output dtype: promote(x, weight), which is
// what the eager formula `weight * x_hat + bias` gives, restricted to x's dtype or
// float32.
at::ScalarType layer_norm_cf_check(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias);

void layer_norm_cf_check_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& mean,
                                  const at::Tensor& rstd);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace hifuse
