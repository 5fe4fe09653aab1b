// Fused activations shared by every batchops op, written once for host and device so the
// CPU tests exercise the same arithmetic the GPU runs.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <c10/util/string_view.h>
#include <string>

namespace batchops {

enum class Activation : int { kNone = 0, kReLU, kSiLU, kGELU, kGELUTanh };

// Accepted names: None, "relu", "silu", "gelu" (exact, erf), "gelu_tanh".
inline Activation parse_activation(std::optional<c10::string_view> name, const char* op) {
  if (!name.has_value()) return Activation::kNone;
  const c10::string_view n = *name;
  if (n == "relu") return Activation::kReLU;
  if (n == "silu") return Activation::kSiLU;
  if (n == "gelu") return Activation::kGELU;
  if (n == "gelu_tanh") return Activation::kGELUTanh;
  TORCH_CHECK_VALUE(false, op, ": activation must be None, 'relu', 'silu', 'gelu' or 'gelu_tanh', got '",
                    std::string(n.data(), n.size()), "'");
}

template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_forward(T x) {
  if constexpr (A == Activation::kNone) {
    return x;
  } else if constexpr (A == Activation::kReLU) {
    return x < T(0) ? T(0) : x;  // NaN stays NaN, as torch.relu
  } else if constexpr (A == Activation::kSiLU) {
    return x / (T(1) + std::exp(-x));
  } else if constexpr (A == Activation::kGELU) {
    return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2)));
  } else {  // tanh approximation, as torch's gelu(approximate="tanh")
    const T kBeta = T(M_SQRT2 * M_2_SQRTPI * 0.5);
    const T inner = kBeta * (x + T(0.044715) * x * x * x);
    return T(0.5) * x * (T(1) + std::tanh(inner));
  }
}

// d act(x) / dx at the pre-activation value x (what backward recomputes).
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_backward(T x) {
  if constexpr (A == Activation::kNone) {
    return T(1);
  } else if constexpr (A == Activation::kReLU) {
    return T(x > T(0));  // a compare, not a branch: keeps the CPU loops vectorised
  } else if constexpr (A == Activation::kSiLU) {
    const T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
  } else if constexpr (A == Activation::kGELU) {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
    const T pdf = std::exp(T(-0.5) * x * x) * T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    return cdf + x * pdf;
  } else {
    const T kBeta = T(M_SQRT2 * M_2_SQRTPI * 0.5);
    const T kKappa = T(0.044715);
    const T x2 = x * x;
    const T inner = kBeta * (x + kKappa * x2 * x);
    const T t = std::tanh(inner);
    const T left = T(0.5) * x;
    const T right = T(1) + t;
    const T left_derivative = T(0.5) * right;
    const T right_derivative = left * (T(1) - t * t) * kBeta * (T(1) + T(3) * kKappa * x2);
    return left_derivative + right_derivative;
  }
}

}  // namespace batchops

// Expands BODY once per activation with `constexpr Activation kAct` in scope.
#define BATCHOPS_DISPATCH_ACTIVATION(ACT, ...)                                   \
  [&] {                                                                          \
    switch (ACT) {                                                               \
      case ::batchops::Activation::kNone: {                                      \
        constexpr ::batchops::Activation kAct = ::batchops::Activation::kNone;   \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case ::batchops::Activation::kReLU: {                                      \
        constexpr ::batchops::Activation kAct = ::batchops::Activation::kReLU;   \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case ::batchops::Activation::kSiLU: {                                      \
        constexpr ::batchops::Activation kAct = ::batchops::Activation::kSiLU;   \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case ::batchops::Activation::kGELU: {                                      \
        constexpr ::batchops::Activation kAct = ::batchops::Activation::kGELU;   \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      default: {                                                                 \
        constexpr ::batchops::Activation kAct = ::batchops::Activation::kGELUTanh; \
        return __VA_ARGS__();                                                    \
      }                                                                          \
    }                                                                            \
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
