// Mean and M2 of the values one thread sees, for LayerNorm statistics: sums shifted by the
// thread's first value, so an element costs two adds and a multiply (Welford's update
// costs an IEEE division), with the same accuracy in fp32 for rows of HiFuse's widths.
// Threads then combine (count, mean, M2) with Chan's formula.
#pragma once

namespace hifuse {

template <typename acc_t>
struct ShiftedSums {
  acc_t count = 0, shift = 0, s1 = 0, s2 = 0;

  __device__ void add(acc_t v) {
    if (count == 0) shift = v;
    const acc_t d = v - shift;
    s1 += d;
    s2 += d * d;
    count += 1;
  }

  // Leaves mean and m2 as they are when no value was added.
  __device__ void finish(acc_t& mean, acc_t& m2) const {
    if (count > 0) {
      mean = shift + s1 / count;
      m2 = max(s2 - s1 * s1 / count, acc_t(0));
    }
  }
};

}  // namespace hifuse
