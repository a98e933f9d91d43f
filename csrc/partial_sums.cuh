// Deterministic column sums for weight and bias gradients: kernels write one row of
// partial sums per chunk of positions, then this kernel adds the rows in order.
#pragma once

#include <cstdint>

namespace hifuse {

template <typename acc_t, typename param_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ part_w, const acc_t* __restrict__ part_b,
                                    int64_t chunks, int64_t n, param_t* __restrict__ dw,
                                    param_t* __restrict__ db) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= n) return;
  acc_t tw = 0, tb = 0;
  for (int64_t i = 0; i < chunks; ++i) {
    tw += part_w[i * n + k];
    tb += part_b[i * n + k];
  }
  dw[k] = static_cast<param_t>(tw);
  db[k] = static_cast<param_t>(tb);
}

}  // namespace hifuse
