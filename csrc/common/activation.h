// Fused activations shared by every batchops op, written once for host and device so the
// CPU tests exercise the same arithmetic the GPU runs.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <c10/util/string_view.h>
#include <string>

namespace batchops {

enum class Activation : int { kNone = 0, kReLU, kSiLU, kGELU, kGELUTanh, kHardswish, kReLU6 };

// The activations' names, the one list of them: the ops parse these, and Python reads them
// from batchops._C (batchops.ops.common.ACTIVATIONS). None is the identity. "gelu" is the exact
// (erf) GELU, "gelu_tanh" its tanh approximation, "hardswish" x * relu6(x + 3) / 6 (MobileNetV3),
// "relu6" min(max(x, 0), 6) (MobileNetV2, MnasNet).
struct ActivationName {
  Activation kind;
  const char* name;
};
inline constexpr ActivationName kActivationNames[] = {
    {Activation::kReLU, "relu"}, {Activation::kSiLU, "silu"}, {Activation::kGELU, "gelu"},
    {Activation::kGELUTanh, "gelu_tanh"}, {Activation::kHardswish, "hardswish"}, {Activation::kReLU6, "relu6"}};

// relu's derivative jumps at 0, hardswish's at -3 and 3, relu6's at 0 and 6: in half precision
// the pre-activation must be rounded as torch rounds it (once, bias included), or a value within
// a rounding of a jump takes the other side's derivative (linear/cpu.cpp, linear/cuda.cu).
C10_HOST_DEVICE constexpr bool activation_derivative_jumps(Activation a) {
  return a == Activation::kReLU || a == Activation::kHardswish || a == Activation::kReLU6;
}

inline Activation parse_activation(std::optional<c10::string_view> name, const char* op) {
  if (!name.has_value()) return Activation::kNone;
  const c10::string_view n = *name;
  std::string accepted = "None";
  for (const ActivationName& a : kActivationNames) {
    if (n == a.name) return a.kind;
    accepted += std::string(", '") + a.name + "'";
  }
  TORCH_CHECK_VALUE(false, op, ": activation must be one of ", accepted, "; got '", std::string(n.data(), n.size()),
                    "'");
}

namespace detail {

// Host float math that GCC vectorises inside `#pragma omp simd` loops: calls to std::exp,
// std::erf and std::tanh stay scalar without -ffast-math, which made fused silu/gelu 5x slower
// than relu on the CPU. Cephes' expf polynomial (about 1 ulp on [-87, 88], clamped outside),
// Abramowitz & Stegun 7.1.26 for erf (absolute error < 1.5e-7), tanh from exp.

// min(max(x, lo), hi) computed on keys that order floats as integers (the sign-magnitude bits
// turned two's complement; -0 just below +0, NaN beyond +-inf). A compare-and-select clamp let
// GCC fold the bound's constant into the rest of the formula: it computed the function twice and
// blended at the end (silu's division twice), where integer min / max are one instruction each.
// Fused silu forward, AVX2 EPYC, cache-warm loop: 1.02-1.40 -> 0.71 ns a value. The key of
// float bits is an involution: the same function turns a key back into bits.
inline int32_t order_key_of_bits(int32_t bits) { return bits ^ ((bits >> 31) & 0x7fffffff); }

inline float clamp_by_order_key(float x, int32_t lo_key, int32_t hi_key) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t key = order_key_of_bits(bits);
  key = key < hi_key ? key : hi_key;
  key = key > lo_key ? key : lo_key;
  bits = order_key_of_bits(key);
  float y;
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}

inline float vector_expf(float x) {
  // [-87, 88]: 0xc2ae0000 is -87.0f's bits, 0x42b00000 88.0f's. NaN goes to a bound, so exp
  // and tanh here are finite at NaN (a select giving NaN back cost silu's backward 20%):
  // every activation takes its NaN from x instead (x * s, x * cdf, 0.5 * x; test_linear's
  // test_nan_propagates).
  x = clamp_by_order_key(x, order_key_of_bits(int32_t(0xc2ae0000u)), 0x42b00000);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (|x / ln 2| < 2^22 here): a vector add and
  // subtract, where a floor through an int conversion and a compare cost 25% more per element.
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  const int32_t i = static_cast<int32_t>(n);
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const int32_t bits = (i + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-x^2) for x >= 0,
// t = 1 / (1 + p x). Here and in linear's GELU intrinsics (linear/cpu_kernels.h).
inline constexpr float kErfP = 0.3275911f;
inline constexpr float kErfA[5] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};

// erf(x) given exp(-x * x), which GELU's derivative needs too (one exp instead of two).
inline float vector_erff_given_exp(float x, float exp_neg_x2) {
  // fabs and copysign are bit operations; selects on x < 0 made GCC compute both signs' paths
  // (two divisions) and blend.
  const float t = 1.0f / (1.0f + kErfP * std::fabs(x));
  const float poly = ((((kErfA[4] * t + kErfA[3]) * t + kErfA[2]) * t + kErfA[1]) * t + kErfA[0]) * t;
  return std::copysign(1.0f - poly * exp_neg_x2, x);
}

inline float vector_erff(float x) { return vector_erff_given_exp(x, vector_expf(-x * x)); }

inline float vector_tanhf(float x) {
  const float e = vector_expf(-2.0f * std::fabs(x));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}

}  // namespace detail

// exp / erf / tanh for the activations: CUDA's own functions on the device and for double,
// the vectorisable float versions above in CPU code. Three look-alike functions on purpose: a
// macro generating them would hide from the reader which math a kernel runs.
template <typename T>
C10_HOST_DEVICE inline T act_exp(T x) {
#if defined(__CUDA_ARCH__)
  return std::exp(x);
#else
  if constexpr (std::is_same_v<T, float>) return detail::vector_expf(x);
  else return std::exp(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T act_erf(T x) {
#if defined(__CUDA_ARCH__)
  return std::erf(x);
#else
  if constexpr (std::is_same_v<T, float>) return detail::vector_erff(x);
  else return std::erf(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T act_tanh(T x) {
#if defined(__CUDA_ARCH__)
  return std::tanh(x);
#else
  if constexpr (std::is_same_v<T, float>) return detail::vector_tanhf(x);
  else return std::tanh(x);
#endif
}

// GELU's normal cdf and pdf at x; on the CPU in float, erf reuses the pdf's exp(-x^2/2).
template <typename T>
C10_HOST_DEVICE inline void gelu_cdf_pdf(T x, T& cdf, T& pdf) {
  const T kInvSqrt2Pi = T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    const float e = detail::vector_expf(-0.5f * x * x);
    cdf = 0.5f * (1.0f + detail::vector_erff_given_exp(x * float(M_SQRT1_2), e));
    pdf = e * kInvSqrt2Pi;
    return;
  }
#endif
  cdf = T(0.5) * (T(1) + act_erf(x * T(M_SQRT1_2)));
  pdf = act_exp(T(-0.5) * x * x) * kInvSqrt2Pi;
}

// relu6: min(max(x, 0), 6) by selects (vectorisable); NaN stays NaN, as in torch.
template <typename T>
C10_HOST_DEVICE inline T clamp_0_6(T x) {
  return x < T(0) ? T(0) : (x > T(6) ? T(6) : x);
}

// act(x), and act'(x) into `derivative`, sharing the transcendental work: linear's forward
// saves the derivative so that its backward is a multiply (see linear/linear.h).
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_forward_with_derivative(T x, T& derivative) {
  if constexpr (A == Activation::kNone) {
    derivative = T(1);
    return x;
  } else if constexpr (A == Activation::kReLU) {
    // torch's relu backward passes the gradient where the output is not <= 0: NaN included.
    derivative = T(!(x <= T(0)));  // a compare, not a branch: keeps the CPU loops vectorised
    return x < T(0) ? T(0) : x;  // NaN stays NaN, as torch.relu
  } else if constexpr (A == Activation::kSiLU) {
    const T s = T(1) / (T(1) + act_exp(-x));
    derivative = s * (T(1) + x * (T(1) - s));
    return x * s;
  } else if constexpr (A == Activation::kGELU) {
    T cdf, pdf;
    gelu_cdf_pdf(x, cdf, pdf);
    derivative = cdf + x * pdf;
    return x * cdf;
  } else if constexpr (A == Activation::kHardswish) {
    // torch's: x * min(max(x + 3, 0), 6) / 6; derivative 0 up to -3 (inclusive), x / 3 + 1/2
    // between, 1 from 3 on (torch's choice at the two kinks, which half precision hits exactly).
    // Selects, not branches; NaN propagates as in torch.
    derivative = x <= T(-3) ? T(0) : (x < T(3) ? x / T(3) + T(0.5) : T(1));
    return x * clamp_0_6(x + T(3)) / T(6);
  } else if constexpr (A == Activation::kReLU6) {
    // torch's (hardtanh(x, 0, 6)): derivative 1 strictly between 0 and 6, 0 at both kinks and
    // outside. Selects; NaN propagates with derivative 0, as in torch's vector loop (its scalar
    // loop gives 1).
    derivative = T((x > T(0)) & (x < T(6)));  // &, not &&: no branch (GCC then vectorises)
    return clamp_0_6(x);
  } else {
    static_assert(A == Activation::kGELUTanh, "activation_forward_with_derivative: no formula for this Activation");
    const T kBeta = T(M_SQRT2 * M_2_SQRTPI * 0.5);
    const T kKappa = T(0.044715);
    const T x2 = x * x;
    const T inner = kBeta * (x + kKappa * x2 * x);
    const T t = act_tanh(inner);
    const T left = T(0.5) * x;
    const T right = T(1) + t;
    const T left_derivative = T(0.5) * right;
    const T right_derivative = left * (T(1) - t * t) * kBeta * (T(1) + T(3) * kKappa * x2);
    derivative = left_derivative + right_derivative;
    return left * right;
  }
}

// act(x). The same arithmetic as activation_forward_with_derivative (whose derivative is then
// dead code), so an output does not depend on whether the derivative was saved.
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_forward(T x) {
  T unused_derivative;
  return activation_forward_with_derivative<A>(x, unused_derivative);
}

// d act(x) / dx at the pre-activation value x (what batch norm's backward recomputes).
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_backward(T x) {
  T derivative;
  (void)activation_forward_with_derivative<A>(x, derivative);  // the unused value is dead code
  return derivative;
}

}  // namespace batchops

// One case of BATCHOPS_DISPATCH_ACTIVATION: BODY with `constexpr Activation kAct = KIND`.
#define BATCHOPS_ACTIVATION_CASE(KIND, ...)                              \
  case ::batchops::Activation::KIND: {                                   \
    constexpr ::batchops::Activation kAct = ::batchops::Activation::KIND; \
    return __VA_ARGS__();                                                \
  }

// Expands BODY once per activation with `constexpr Activation kAct` in scope.
#define BATCHOPS_DISPATCH_ACTIVATION(ACT, ...)                                            \
  [&] {                                                                                   \
    switch (ACT) {                                                                        \
      BATCHOPS_ACTIVATION_CASE(kNone, __VA_ARGS__)                                        \
      BATCHOPS_ACTIVATION_CASE(kReLU, __VA_ARGS__)                                        \
      BATCHOPS_ACTIVATION_CASE(kSiLU, __VA_ARGS__)                                        \
      BATCHOPS_ACTIVATION_CASE(kGELU, __VA_ARGS__)                                        \
      BATCHOPS_ACTIVATION_CASE(kGELUTanh, __VA_ARGS__)                                    \
      BATCHOPS_ACTIVATION_CASE(kHardswish, __VA_ARGS__)                                   \
      BATCHOPS_ACTIVATION_CASE(kReLU6, __VA_ARGS__)                                       \
      default:                                                                            \
        TORCH_CHECK(false, "batchops: no kernel for activation ", static_cast<int>(ACT)); \
    }                                                                                     \
  }()

#define BATCHOPS_DISPATCH_BOOL(VALUE, NAME, ...) \
  [&] {                                          \
    if (VALUE) {                                 \
      constexpr bool NAME = true;                \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr bool NAME = false;               \
      return __VA_ARGS__();                      \
    }                                            \
  }()
