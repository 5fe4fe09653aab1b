// The linear epilogues on the CPU: elementwise passes over contiguous (rows, N) blocks that
// the products (ATen's BLAS) leave behind. Compiled once per CPU instruction set (cpu.cpp,
// cpu_avx2.cpp, cpu_avx512.cpp), each time inside its own namespace BATCHOPS_CPU_NS; cpu.cpp
// picks one at run time. Single-threaded: cpu.cpp runs them on row blocks in parallel, right
// after each block's product so the block is still in cache.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <iterator>  // std::size

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

#if defined(BATCHOPS_CPU_AVX512_INTRINSICS) || defined(BATCHOPS_CPU_AVX2_INTRINSICS)
// The constants of the GELU intrinsics below, one set for both instruction sets.
// exp(-x^2 / 2) = 2^t, t = x^2 * kGeluExp2Scale.
constexpr float kGeluExp2Scale = -0.72134752044448170f;  // -log2(e) / 2
// 2^f on [-1/2, 1/2], highest degree first (relative error 2.4e-7).
constexpr float kExp2Poly[6] = {1.3276183744892478e-3f, 9.675540030002594e-3f, 5.550714209675789e-2f,
                                2.4022120237350464e-1f, 6.931469440460205e-1f, 1.0000001192092896f};
// erf's t = 1 / (1 + p |x| / sqrt 2) (activation.h's A & S 7.1.26 at x / sqrt 2).
constexpr float kGeluErfP = float(detail::kErfP * M_SQRT1_2);
// erfc(|x| / sqrt 2) / 2 = poly(s) s e: A & S's coefficients halved, highest degree first.
constexpr float kHalfErfcPoly[5] = {0.5f * detail::kErfA[4], 0.5f * detail::kErfA[3], 0.5f * detail::kErfA[2],
                                    0.5f * detail::kErfA[1], 0.5f * detail::kErfA[0]};
constexpr float kGeluPdfScale = float(M_2_SQRTPI * M_SQRT1_2 * 0.5);  // 1 / sqrt(2 pi)
#endif

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
  const __m512 t = _mm512_max_ps(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(kGeluExp2Scale)),
                                 _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 frac = _mm512_sub_ps(t, n);
  __m512 p2 = _mm512_set1_ps(kExp2Poly[0]);
  for (size_t i = 1; i < std::size(kExp2Poly); ++i) {  // Horner (unrolled by GCC: a constant count)
    p2 = _mm512_fmadd_ps(p2, frac, _mm512_set1_ps(kExp2Poly[i]));
  }
  const __m512 e = _mm512_scalef_ps(p2, n);
  // erfc(|x| / sqrt 2) / 2 = poly(s) s e, s = 1 / (1 + p |x| / sqrt 2), coefficients halved.
  // |x| capped where q is 0 anyway, so that the Newton step below never meets rcp(inf) * inf:
  // gelu(+inf) = inf, as torch's (its derivative there NaN, as torch's: inf * pdf with pdf 0).
  const __m512 den = _mm512_fmadd_ps(_mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(1e30f)),
                                     _mm512_set1_ps(kGeluErfP), one);
  __m512 s = _mm512_rcp14_ps(den);
  s = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(den, s, one), s);  // Newton: 2^-28 relative
  __m512 poly = _mm512_set1_ps(kHalfErfcPoly[0]);
  for (size_t i = 1; i < std::size(kHalfErfcPoly); ++i) {
    poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(kHalfErfcPoly[i]));
  }
  const __m512 q = _mm512_mul_ps(_mm512_mul_ps(poly, s), e);
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, q), q);
  const __m512 pdf = _mm512_mul_ps(e, _mm512_set1_ps(kGeluPdfScale));
  derivative = _mm512_fmadd_ps(x, pdf, cdf);
  return _mm512_mul_ps(x, cdf);
}

// GeluLanes: the float GELU (+ derivative) of `count` (<= kWidth) values z + bias, in place, the
// derivative stored too when kDerivative. One per instruction set; gelu_rows below walks the rows.
struct GeluLanes {
  static constexpr int64_t kWidth = 16;
  template <bool kDerivative>
  static void apply(float* z, float* derivative, const float* bias, int64_t count) {
    const __mmask16 lanes = count >= kWidth ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, z), _mm512_maskz_loadu_ps(lanes, bias));
    __m512 d;
    _mm512_mask_storeu_ps(z, lanes, gelu_with_derivative_ps(v, d));  // d's math is dead code without kDerivative
    if constexpr (kDerivative) _mm512_mask_storeu_ps(derivative, lanes, d);
  }
};
#elif defined(BATCHOPS_CPU_AVX2_INTRINSICS)
// The same in AVX2 (8 lanes): the auto-vectorised loop of activation.h made Linear+GELU's forward
// 1.06x torch's on an AMD EPYC without AVX-512 (its epilogue 1.5 ms against torch's whole GELU
// 1.05 at 8192x256). AVX2 has no scalef and no masks: 2^n is built from its exponent bits for t
// clamped at -100 and e set to 0 below (|x| > 11.8, where q and the pdf are below 1e-30), so no
// value becomes subnormal; the reciprocal starts from rcp_ps (12 bits; one Newton step: ~2^-23);
// the tail goes through maskload / maskstore.
inline __m256 gelu_with_derivative_ps(__m256 x, __m256& derivative) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t_exact = _mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(kGeluExp2Scale));
  const __m256 t = _mm256_max_ps(t_exact, _mm256_set1_ps(-100.0f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_sub_ps(t, n);
  __m256 p2 = _mm256_set1_ps(kExp2Poly[0]);
  for (size_t i = 1; i < std::size(kExp2Poly); ++i) {  // Horner (unrolled by GCC: a constant count)
    p2 = _mm256_fmadd_ps(p2, frac, _mm256_set1_ps(kExp2Poly[i]));
  }
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  // Zero below the clamp (the value is below 1e-30 there), as scalef's underflow gives on AVX-512.
  const __m256 e = _mm256_and_ps(_mm256_mul_ps(p2, _mm256_castsi256_ps(power)),
                                 _mm256_cmp_ps(t_exact, _mm256_set1_ps(-100.0f), _CMP_GE_OQ));
  // |x| capped as in the AVX-512 version: gelu(+inf) = inf, its derivative NaN, as torch's.
  const __m256 abs_x = _mm256_min_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(1e30f));
  const __m256 den = _mm256_fmadd_ps(abs_x, _mm256_set1_ps(kGeluErfP), one);
  __m256 s = _mm256_rcp_ps(den);
  s = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(den, s, one), s);
  __m256 poly = _mm256_set1_ps(kHalfErfcPoly[0]);
  for (size_t i = 1; i < std::size(kHalfErfcPoly); ++i) {
    poly = _mm256_fmadd_ps(poly, s, _mm256_set1_ps(kHalfErfcPoly[i]));
  }
  const __m256 q = _mm256_mul_ps(_mm256_mul_ps(poly, s), e);
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 cdf = _mm256_blendv_ps(_mm256_sub_ps(one, q), q, negative);
  const __m256 pdf = _mm256_mul_ps(e, _mm256_set1_ps(kGeluPdfScale));
  derivative = _mm256_fmadd_ps(x, pdf, cdf);
  return _mm256_mul_ps(x, cdf);
}

struct GeluLanes {
  static constexpr int64_t kWidth = 8;
  template <bool kDerivative>
  static void apply(float* z, float* derivative, const float* bias, int64_t count) {
    __m256 d;
    if (count >= kWidth) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(z), _mm256_loadu_ps(bias));
      _mm256_storeu_ps(z, gelu_with_derivative_ps(v, d));
      if constexpr (kDerivative) _mm256_storeu_ps(derivative, d);
      return;
    }
    // Lane i on (all bits set: maskload and maskstore read the sign bit) where count > i.
    const __m256i lanes =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 v = _mm256_add_ps(_mm256_maskload_ps(z, lanes), _mm256_maskload_ps(bias, lanes));
    _mm256_maskstore_ps(z, lanes, gelu_with_derivative_ps(v, d));
    if constexpr (kDerivative) _mm256_maskstore_ps(derivative, lanes, d);
  }
};
#endif

#if defined(BATCHOPS_CPU_AVX512_INTRINSICS) || defined(BATCHOPS_CPU_AVX2_INTRINSICS)
template <bool kDerivative>
void gelu_rows(float* z, float* derivative, const float* bias, int64_t rows, int64_t N) {
  constexpr int64_t W = GeluLanes::kWidth;
  for (int64_t r = 0; r < rows; ++r) {
    float* zr = z + r * N;
    // Without kDerivative nothing is stored through dr; it points at zr so that dr + j stays
    // valid pointer arithmetic (derivative is null then).
    float* dr = kDerivative ? derivative + r * N : zr;
    int64_t j = 0;
    for (; j + 2 * W <= N; j += 2 * W) {  // two independent vectors per step for the out-of-order core
      GeluLanes::apply<kDerivative>(zr + j, dr + j, bias + j, W);
      GeluLanes::apply<kDerivative>(zr + j + W, dr + j + W, bias + j + W, W);
    }
    for (; j < N; j += W) GeluLanes::apply<kDerivative>(zr + j, dr + j, bias + j, N - j);
  }
}

template <>
void forward_rows<float, Activation::kGELU>(float* z, float* derivative, const float* bias, int64_t rows, int64_t N) {
  if (derivative != nullptr) {
    gelu_rows<true>(z, derivative, bias, rows, N);
  } else {
    gelu_rows<false>(z, derivative, bias, rows, N);
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
