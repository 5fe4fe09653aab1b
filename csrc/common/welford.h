// Per-channel statistics: Welford's update for one value and Chan's merge of two partial
// results. Host and device share these so the CPU tests cover the GPU's arithmetic.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace batchops {

template <typename acc_t>
struct WelfordData {
  acc_t mean = acc_t(0);
  acc_t m2 = acc_t(0);  // sum of squared deviations from mean
  int64_t count = 0;
};

template <typename acc_t>
C10_HOST_DEVICE inline void welford_update(WelfordData<acc_t>& s, acc_t x) {
  s.count += 1;
  const acc_t delta = x - s.mean;
  s.mean += delta / acc_t(s.count);
  s.m2 += delta * (x - s.mean);
}

// Chan et al.'s parallel merge; stable for large means because it only adds deviations.
template <typename acc_t>
C10_HOST_DEVICE inline WelfordData<acc_t> welford_merge(const WelfordData<acc_t>& a, const WelfordData<acc_t>& b) {
  const int64_t n = a.count + b.count;
  if (n == 0) return a;
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const acc_t nb_over_n = acc_t(b.count) / acc_t(n);
  const acc_t delta = b.mean - a.mean;
  WelfordData<acc_t> out;
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * acc_t(a.count) * nb_over_n;
  out.count = n;
  return out;
}

}  // namespace batchops
