// Linear layers: y = act(x W^T + b), dense and grouped (uniform or ragged groups).
//
// The plan (argument checks, shapes, group offsets, allocation) is shared by the CPU and
// CUDA implementations so both reject the same inputs with the same messages; the epilogue
// arithmetic is written once for host and device.
//
// What forward saves for backward (the second output, "saved"):
//   activation None       nothing (an empty tensor): the gradient passes straight through
//   "relu"                nothing: backward reads the output, since y > 0 exactly when x W^T + b > 0
//   "silu" / "gelu*" /    the activation's derivative act'(x W^T + b), in the input's dtype
//   "hardswish" / "relu6" (hardswish's output does not give its derivative: it is not monotonic;
//                         relu6's could, 0 < y < 6, but linear + relu6 is rare: one path). The
//                         forward epilogue has the transcendental work for it at hand (GELU's
//                         cdf and pdf, SiLU's sigmoid), so backward is a multiply instead of a
//                         second round of exp / erf: on the CPU, where both epilogues are bound
//                         by memory and arithmetic alike, that is most of what fusing wins back.
//                         The same number of (rows, N) buffers as saving the product: the
//                         product's buffer becomes the output or the derivative. Second
//                         derivatives are not supported (linear/autograd.cpp), so nothing
//                         needs the pre-activation itself. Without autograd (the op's
//                         save_for_backward=False, which batchops.functional passes when no
//                         gradient is needed) the derivative is neither computed nor written.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_unsafe_view.h>
#include <c10/macros/Macros.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/activation.h"

namespace batchops {

// ---------------------------------------------------------------------------------------
// The ops (common/op.h): name, schema and C++ signature, said once. schema.cpp defines them,
// entry_points.h implements them for both devices, autograd.cpp adds the Autograd kernels and
// batchops/ops/linear.py the fake ones.

// output = act(input @ weight^T + bias). `saved`: see the top of this file.
struct LinearForwardOp {
  static constexpr const char* name = "linear_forward";
  static constexpr const char* schema =
      "linear_forward(Tensor input, Tensor weight, Tensor? bias, str? activation, bool save_for_backward=True) "
      "-> (Tensor output, Tensor saved)";
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& input, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 std::optional<c10::string_view> activation, bool save_for_backward);
};

inline constexpr const char* kLinearDoubleBackwardError =
    "batchops.linear / batchops.grouped_linear: double backward (a gradient of the gradient) is not supported. "
    "Use torch.nn.functional.linear (per group) and the activation separately where second derivatives are needed.";

// output_mask: grad_input, grad_weight, grad_bias; unrequested ones are empty.
struct LinearBackwardOp {
  static constexpr const char* name = "linear_backward";
  static constexpr const char* schema =
      "linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, Tensor output, "
      "Tensor saved, str? activation, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)";
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& output, const at::Tensor& saved,
      std::optional<c10::string_view> activation, std::array<bool, 3> output_mask);
  static constexpr const char* double_backward_error = kLinearDoubleBackwardError;
};

// Grouped: weight (G, out, in), bias (G, out). Without group_sizes the input is (G, ..., in);
// with them it is (total_rows, in), rows ordered by group, group_sizes (G) integers on the
// CPU or the input's device. group_offsets: the groups' row offsets, int64 (G + 1) on the
// input's device; backward takes them (optional) instead of uploading host sizes, or checking
// and summing device sizes, a second time.
struct GroupedLinearForwardOp {
  static constexpr const char* name = "grouped_linear_forward";
  static constexpr const char* schema =
      "grouped_linear_forward(Tensor input, Tensor weight, Tensor? bias, Tensor? group_sizes, str? activation, "
      "bool save_for_backward=True) -> (Tensor output, Tensor saved, Tensor group_offsets)";
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& group_sizes, std::optional<c10::string_view> activation,
      bool save_for_backward);
};

struct GroupedLinearBackwardOp {
  static constexpr const char* name = "grouped_linear_backward";
  static constexpr const char* schema =
      "grouped_linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? group_sizes, Tensor output, Tensor saved, str? activation, bool[3] output_mask, "
      "Tensor? group_offsets=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)";
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_sizes, const at::Tensor& output,
      const at::Tensor& saved, std::optional<c10::string_view> activation, std::array<bool, 3> output_mask,
      const std::optional<at::Tensor>& group_offsets);
  static constexpr const char* double_backward_error = kLinearDoubleBackwardError;
};

// ---------------------------------------------------------------------------------------
// Plans

enum class LinearMode { kDense, kUniform, kRagged };

C10_HOST_DEVICE constexpr bool activation_saves_derivative(Activation a) {
  return a == Activation::kSiLU || a == Activation::kGELU || a == Activation::kGELUTanh ||
         a == Activation::kHardswish || a == Activation::kReLU6;
}

struct LinearPlan {
  const char* op = "";
  LinearMode mode = LinearMode::kDense;
  Activation act = Activation::kNone;
  int64_t G = 1;     // groups (1 for dense)
  int64_t rows = 0;  // rows of all groups together
  int64_t K = 0;     // in_features
  int64_t N = 0;     // out_features
  at::Tensor x;           // (rows, K), contiguous, detached
  at::Tensor weight;      // dense (N, K); grouped (G, N, K); contiguous
  at::Tensor bias;        // dense (N); grouped (G, N); undefined when there is none
  at::Tensor group_sizes; // ragged with sizes on the GPU: int64 (G), not checked on the host
  // Row offsets of the groups (G + 1 entries) when known on the host: always on the CPU, and
  // for dense / uniform input on CUDA. Empty for ragged CUDA input whose sizes live on the GPU.
  std::vector<int64_t> offsets;
  // The same offsets as an int64 (G + 1) tensor on the input's device, made once: by
  // plan_group_offsets, or given to backward (forward's group_offsets output) so that backward
  // neither uploads host sizes again nor checks and sums device sizes again.
  at::Tensor group_offsets;
  std::vector<int64_t> in_sizes;   // the input's shape (grad_input gets it)
  std::vector<int64_t> out_sizes;  // the output's shape
  bool save_for_backward = true;   // forward: write "saved" (see the top of the file)
};

LinearPlan plan_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       std::optional<c10::string_view> activation);
LinearPlan plan_grouped_linear(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_sizes,
                               std::optional<c10::string_view> activation,
                               const std::optional<at::Tensor>& group_offsets = std::nullopt);

// p.group_offsets, made on first use: on the CPU from the host offsets; on CUDA from host
// sizes through pinned memory without blocking (plan_grouped_linear), from device sizes by a
// cumulative sum after device-side checks (raising on the host would need a sync), and for
// uniform groups as g * rows_per_group.
const at::Tensor& plan_group_offsets(LinearPlan& p);

// The backward's view of the same shapes: forward's plan plus the incoming gradient and what
// forward saved, all as (rows, N), contiguous.
struct LinearBackwardPlan {
  LinearPlan fwd;
  at::Tensor grad_output;  // (rows, N)
  at::Tensor saved;        // relu: output; silu/gelu*: act'(x W^T + b); else undefined
  std::array<bool, 3> mask{};  // grad_input, grad_weight, grad_bias
};

LinearBackwardPlan plan_linear_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& group_sizes, const at::Tensor& output,
                                        const at::Tensor& saved, std::optional<c10::string_view> activation,
                                        std::array<bool, 3> output_mask, bool grouped,
                                        const std::optional<at::Tensor>& group_offsets = std::nullopt);

// Whether forward's "saved" output is the (rows, N) derivative (else an empty tensor).
inline bool plan_saves_derivative(const LinearPlan& p) {
  return p.save_for_backward && activation_saves_derivative(p.act);
}

// A kernel's result in its final shape, NOT as a view of the 2-D buffer it was computed in:
// an op output that autograd sees as a view (of a base no one else holds) cannot be modified
// in place (`y = linear(x); y += residual` fails), and a gradient that is a view gets stolen
// as one by AccumulateGrad. matmul returns its reshaped results the same way.
inline at::Tensor linear_shaped(const at::Tensor& t, at::IntArrayRef sizes) { return at::_unsafe_view(t, sizes); }

// The products of dense and uniform groups, by ATen's BLAS for both devices (products.cpp):
// z = x W^T (+ bias when with_bias), z (rows, N); and grad_input = dz W, grad_weight = dz^T x
// into those of the two outputs that are defined (requested).
void linear_product_out(const LinearPlan& p, at::Tensor z, bool with_bias);
void linear_backward_products_out(const LinearPlan& p, const at::Tensor& dz, at::Tensor grad_input,
                                  at::Tensor grad_weight);

// Empty results for outputs that were not requested, in one place.
at::Tensor linear_undefined_grad(const at::Tensor& like);

// ---------------------------------------------------------------------------------------
// Epilogue arithmetic (host + device), in the accumulation type acc_t.

// Forward: the activation of the biased product (relu, None: nothing is saved).
template <Activation A, typename acc_t>
C10_HOST_DEVICE inline acc_t linear_epilogue(acc_t product, acc_t bias) {
  return activation_forward<A>(product + bias);
}

// Forward for silu / gelu*: the activation, and its derivative into `derivative` (saved).
template <Activation A, typename acc_t>
C10_HOST_DEVICE inline acc_t linear_epilogue_saving_derivative(acc_t product, acc_t bias, acc_t& derivative) {
  return activation_forward_with_derivative<A>(product + bias, derivative);
}

// Backward: d act / d pre at this element, from what forward saved (see the top of the file).
template <Activation A, typename acc_t>
C10_HOST_DEVICE inline acc_t linear_grad_factor(acc_t saved) {
  if constexpr (A == Activation::kNone) {
    return acc_t(1);
  } else if constexpr (A == Activation::kReLU) {
    // saved is the output: not <= 0 exactly where the input was > 0 or NaN (torch's relu
    // backward masks `output <= 0`, so NaN passes the gradient).
    return acc_t(!(saved <= acc_t(0)));
  } else {
    return saved;
  }
}

}  // namespace batchops
