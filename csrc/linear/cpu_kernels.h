// The linear epilogues on the CPU: elementwise passes over contiguous (rows, N) blocks that
// the products (ATen's BLAS) leave behind. Compiled once per CPU instruction set (cpu.cpp,
// cpu_avx2.cpp, cpu_avx512.cpp), each time inside its own namespace BATCHOPS_CPU_NS; cpu.cpp
// picks one at run time. Single-threaded: cpu.cpp runs them on row blocks in parallel, right
// after each block's product so the block is still in cache.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "linear/linear.h"
#include "common/cpu_dtypes.h"  // BATCHOPS_CPU_DISPATCH_DTYPES for this build

#ifndef BATCHOPS_CPU_NS
#error "define BATCHOPS_CPU_NS before including linear/cpu_kernels.h"
#endif

namespace batchops {
namespace BATCHOPS_CPU_NS {
namespace {

// z = act(z + bias) in place; when derivative is not null (silu / gelu* with autograd) also
// derivative = act'(z + bias), what backward needs. bias: N values in the accumulation type.
template <typename scalar_t, Activation A>
void forward_rows(scalar_t* z, scalar_t* derivative, const at::opmath_type<scalar_t>* bias, int64_t rows, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* zr = z + r * N;
    if (activation_saves_derivative(A) && derivative != nullptr) {
      scalar_t* dr = derivative + r * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        acc_t d;
        zr[j] = scalar_t(linear_epilogue_saving_derivative<A, acc_t>(acc_t(zr[j]), bias[j], d));
        dr[j] = scalar_t(d);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) zr[j] = scalar_t(linear_epilogue<A, acc_t>(acc_t(zr[j]), bias[j]));
    }
  }
}

#if defined(BATCHOPS_CPU_AVX512_INTRINSICS)
// Float GELU and its derivative, 16 lanes at a time in AVX-512 intrinsics (Linear+GELU's
// case). The epilogue is bound by memory and arithmetic about equally, so the arithmetic is
// cut to ~30 instructions a vector: erf by Abramowitz & Stegun 7.1.26 given exp(-x^2/2)
// (absolute error < 1.5e-7, as in activation.h), a reciprocal estimate plus one Newton step
// instead of a division, exp(-x^2/2) as 2^t with a degree-5 polynomial for 2^frac (relative
// error 2.4e-7, fitted on [-1/2, 1/2]) and scalef for the power of two, the polynomial's
// halving folded into its coefficients, and the cdf taken as q or 1 - q, q = erfc(|x|/sqrt 2)/2,
// instead of fixing erf's sign. The auto-vectorised loop of activation.h, with its vdivps
// and Cephes exp, took about twice as long.
inline __m512 gelu_with_derivative_ps(__m512 x, __m512& derivative) {
  const __m512 one = _mm512_set1_ps(1.0f);
  // exp(-x^2 / 2) = 2^t, t = -x^2 log2(e) / 2, clamped where the result is 0 in float anyway.
  const __m512 t = _mm512_max_ps(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.72134752044448170f)),
                                 _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 frac = _mm512_sub_ps(t, n);
  __m512 p2 = _mm512_set1_ps(1.3276183744892478e-3f);
  p2 = _mm512_fmadd_ps(p2, frac, _mm512_set1_ps(9.675540030002594e-3f));
  p2 = _mm512_fmadd_ps(p2, frac, _mm512_set1_ps(5.550714209675789e-2f));
  p2 = _mm512_fmadd_ps(p2, frac, _mm512_set1_ps(2.4022120237350464e-1f));
  p2 = _mm512_fmadd_ps(p2, frac, _mm512_set1_ps(6.931469440460205e-1f));
  p2 = _mm512_fmadd_ps(p2, frac, _mm512_set1_ps(1.0000001192092896f));
  const __m512 e = _mm512_scalef_ps(p2, n);
  // erfc(|x| / sqrt 2) / 2 = poly(s) s e, s = 1 / (1 + p |x| / sqrt 2), coefficients halved.
  const __m512 den = _mm512_fmadd_ps(_mm512_abs_ps(x), _mm512_set1_ps(float(0.3275911 * M_SQRT1_2)), one);
  __m512 s = _mm512_rcp14_ps(den);
  s = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(den, s, one), s);  // Newton: 2^-28 relative
  __m512 poly = _mm512_set1_ps(0.5f * 1.061405429f);
  poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(0.5f * -1.453152027f));
  poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(0.5f * 1.421413741f));
  poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(0.5f * -0.284496736f));
  poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(0.5f * 0.254829592f));
  const __m512 q = _mm512_mul_ps(_mm512_mul_ps(poly, s), e);
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, q), q);
  const __m512 pdf = _mm512_mul_ps(e, _mm512_set1_ps(float(M_2_SQRTPI * M_SQRT1_2 * 0.5)));
  derivative = _mm512_fmadd_ps(x, pdf, cdf);
  return _mm512_mul_ps(x, cdf);
}

template <bool kDerivative>
inline void gelu_vector_avx512(float* z, float* derivative, const float* bias, __mmask16 lanes) {
  const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, z), _mm512_maskz_loadu_ps(lanes, bias));
  __m512 d;
  _mm512_mask_storeu_ps(z, lanes, gelu_with_derivative_ps(v, d));  // d's math is dead code without kDerivative
  if constexpr (kDerivative) _mm512_mask_storeu_ps(derivative, lanes, d);
}

template <bool kDerivative>
void gelu_rows_avx512(float* z, float* derivative, const float* bias, int64_t rows, int64_t N) {
  const __mmask16 all = 0xFFFF;
  for (int64_t r = 0; r < rows; ++r) {
    float* zr = z + r * N;
    // Without kDerivative nothing is stored through dr; it points at zr so that dr + j stays
    // valid pointer arithmetic (derivative is null then).
    float* dr = kDerivative ? derivative + r * N : zr;
    int64_t j = 0;
    for (; j + 32 <= N; j += 32) {  // two independent vectors per step for the out-of-order core
      gelu_vector_avx512<kDerivative>(zr + j, dr + j, bias + j, all);
      gelu_vector_avx512<kDerivative>(zr + j + 16, dr + j + 16, bias + j + 16, all);
    }
    for (; j < N; j += 16) {
      gelu_vector_avx512<kDerivative>(zr + j, dr + j, bias + j,
                                      N - j >= 16 ? all : __mmask16((1u << (N - j)) - 1u));
    }
  }
}

template <>
void forward_rows<float, Activation::kGELU>(float* z, float* derivative, const float* bias, int64_t rows, int64_t N) {
  if (derivative != nullptr) {
    gelu_rows_avx512<true>(z, derivative, bias, rows, N);
  } else {
    gelu_rows_avx512<false>(z, derivative, bias, rows, N);
  }
}
#endif

// dz = dy * act'(pre), act' from what forward saved, written when kWriteDz; bias_sum[j] += dz
// when kSum. The sum is a vertical update (one accumulator per column), so it vectorises like
// the rest.
template <typename scalar_t, Activation A, bool kWriteDz, bool kSum>
void backward_rows(const scalar_t* dy, const scalar_t* saved, scalar_t* dz, at::opmath_type<scalar_t>* bias_sum,
                   int64_t rows, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* dyr = dy + r * N;
    const scalar_t* sr = saved + r * N;
    scalar_t* dzr = dz + r * N;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const acc_t g = acc_t(dyr[j]) * linear_grad_factor<A, acc_t>(acc_t(sr[j]));
      if constexpr (kWriteDz) dzr[j] = scalar_t(g);
      if constexpr (kSum) bias_sum[j] += g;
    }
  }
}

}  // namespace

void linear_epilogue_forward(at::ScalarType dtype, Activation act, void* z, void* derivative, const void* bias,
                             int64_t rows, int64_t N) {
  BATCHOPS_CPU_DISPATCH_DTYPES(dtype, "batchops.linear", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BATCHOPS_DISPATCH_ACTIVATION(act, [&] {
      forward_rows<scalar_t, kAct>(static_cast<scalar_t*>(z), static_cast<scalar_t*>(derivative),
                                   static_cast<const acc_t*>(bias), rows, N);
    });
  });
}

// saved: what forward saved (see linear.h); for activation None pass dy. dz may be null (not
// written), bias_sum may be null (no bias gradient); not both.
void linear_epilogue_backward(at::ScalarType dtype, Activation act, const void* dy, const void* saved, void* dz,
                              void* bias_sum, int64_t rows, int64_t N) {
  BATCHOPS_CPU_DISPATCH_DTYPES(dtype, "batchops.linear_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BATCHOPS_DISPATCH_ACTIVATION(act, [&] {
      const auto* dy_ = static_cast<const scalar_t*>(dy);
      const auto* saved_ = static_cast<const scalar_t*>(saved);
      auto* dz_ = static_cast<scalar_t*>(dz);
      auto* sum_ = static_cast<acc_t*>(bias_sum);
      if (dz_ != nullptr && sum_ != nullptr) {
        backward_rows<scalar_t, kAct, true, true>(dy_, saved_, dz_, sum_, rows, N);
      } else if (dz_ != nullptr) {
        backward_rows<scalar_t, kAct, true, false>(dy_, saved_, dz_, sum_, rows, N);
      } else {
        backward_rows<scalar_t, kAct, false, true>(dy_, saved_, dz_, sum_, rows, N);
      }
    });
  });
}

}  // namespace BATCHOPS_CPU_NS
}  // namespace batchops
