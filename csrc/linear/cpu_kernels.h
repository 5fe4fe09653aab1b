// The linear epilogues on the CPU: elementwise passes over contiguous (rows, N) blocks that
// the products (ATen's BLAS) leave behind. Compiled once per CPU instruction set (cpu.cpp,
// cpu_avx2.cpp, cpu_avx512.cpp), each time inside its own namespace BATCHOPS_CPU_NS; cpu.cpp
// picks one at run time. Single-threaded: cpu.cpp runs them on row blocks in parallel, right
// after each block's product so the block is still in cache.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "linear/linear.h"

#ifndef BATCHOPS_CPU_NS
#error "define BATCHOPS_CPU_NS before including linear/cpu_kernels.h"
#endif

namespace batchops {
namespace BATCHOPS_CPU_NS {
namespace {

// y = act(z + bias); y may be z (in place). bias: N values in the accumulation type.
template <typename scalar_t, Activation A>
void forward_rows(const scalar_t* z, scalar_t* y, const at::opmath_type<scalar_t>* bias, int64_t rows, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* zr = z + r * N;
    scalar_t* yr = y + r * N;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) yr[j] = scalar_t(linear_epilogue<A, acc_t>(acc_t(zr[j]), bias[j]));
  }
}

// dz = dy * act'(saved, bias), written when kWriteDz; bias_sum[j] += dz when kSum. The sum is
// a vertical update (one accumulator per column), so it vectorises like the rest.
template <typename scalar_t, Activation A, bool kWriteDz, bool kSum>
void backward_rows(const scalar_t* dy, const scalar_t* saved, const at::opmath_type<scalar_t>* bias, scalar_t* dz,
                   at::opmath_type<scalar_t>* bias_sum, int64_t rows, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* dyr = dy + r * N;
    const scalar_t* sr = saved + r * N;
    scalar_t* dzr = dz + r * N;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const acc_t g = acc_t(dyr[j]) * linear_grad_factor<A, acc_t>(acc_t(sr[j]), bias[j]);
      if constexpr (kWriteDz) dzr[j] = scalar_t(g);
      if constexpr (kSum) bias_sum[j] += g;
    }
  }
}

}  // namespace

void linear_epilogue_forward(at::ScalarType dtype, Activation act, const void* z, void* y, const void* bias,
                             int64_t rows, int64_t N) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batchops.linear", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BATCHOPS_DISPATCH_ACTIVATION(act, [&] {
      forward_rows<scalar_t, kAct>(static_cast<const scalar_t*>(z), static_cast<scalar_t*>(y),
                                   static_cast<const acc_t*>(bias), rows, N);
    });
  });
}

// saved: what forward saved (see linear.h); for activation None pass dy. dz may be null (not
// written), bias_sum may be null (no bias gradient); not both.
void linear_epilogue_backward(at::ScalarType dtype, Activation act, const void* dy, const void* saved,
                              const void* bias, void* dz, void* bias_sum, int64_t rows, int64_t N) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batchops.linear_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BATCHOPS_DISPATCH_ACTIVATION(act, [&] {
      const auto* dy_ = static_cast<const scalar_t*>(dy);
      const auto* saved_ = static_cast<const scalar_t*>(saved);
      const auto* bias_ = static_cast<const acc_t*>(bias);
      auto* dz_ = static_cast<scalar_t*>(dz);
      auto* sum_ = static_cast<acc_t*>(bias_sum);
      if (dz_ != nullptr && sum_ != nullptr) {
        backward_rows<scalar_t, kAct, true, true>(dy_, saved_, bias_, dz_, sum_, rows, N);
      } else if (dz_ != nullptr) {
        backward_rows<scalar_t, kAct, true, false>(dy_, saved_, bias_, dz_, sum_, rows, N);
      } else {
        backward_rows<scalar_t, kAct, false, true>(dy_, saved_, bias_, dz_, sum_, rows, N);
      }
    });
  });
}

}  // namespace BATCHOPS_CPU_NS
}  // namespace batchops
