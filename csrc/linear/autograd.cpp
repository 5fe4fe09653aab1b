// Autograd for the four linear ops, in C++ (the Autograd dispatch key, both devices); why C++:
// common/autograd.h. Measured: a 64 x 256 -> 256 layer's forward + backward took 0.26 ms with
// torch.library.register_autograd and 0.17-0.22 ms with this (torch: 0.23-0.25 ms); ~1-2% of
// the 8192 x 256 -> 256 benchmark step.
//
// Forward saves input, weight, bias and `saved` (the activation's derivative for silu / gelu*,
// see linear.h), plus the output for relu. `saved` gets no grad_fn: it is for our backward
// only. Second derivatives are not supported: the backward ops raise when a gradient of the
// gradient is asked for.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/activation.h"
#include "common/autograd.h"
#include "linear/linear.h"

namespace batchops {
namespace {

using namespace batchops::autograd;
using Mask = std::array<bool, 3>;

Activation kind(const std::optional<std::string>& act) { return parse_activation(name_view(act), "batchops.linear"); }

// Backward of linear_forward (kGrouped false) and grouped_linear_forward (true). Next edges:
// input, weight, bias (invalid when there is none); group sizes and offsets take no gradient.
template <bool kGrouped>
struct LinearBackwardNode final : public BackwardNode<LinearBackwardNode<kGrouped>> {
  std::string name() const override {
    return kGrouped ? "batchops::GroupedLinearBackward" : "batchops::LinearBackward";
  }
  auto fields() {
    return std::tie(input, weight, bias, output, saved, group_sizes, group_offsets, activation, save_for_backward);
  }

  static variable_list backward(const variable_list& grads, const std::vector<bool>& needed, const Tensor& x,
                                const Tensor& weight, const Tensor& bias, const Tensor& output, const Tensor& saved,
                                const Tensor& group_sizes, const Tensor& group_offsets,
                                const std::optional<std::string>& activation, bool save_for_backward) {
    const Mask mask = {needed[0], needed[1], needed[2]};
    variable_list result(3);
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2])) return result;
    TORCH_CHECK(save_for_backward || !activation_saves_derivative(kind(activation)),
                "batchops linear backward: the forward op ran with save_for_backward=False, so it saved nothing for "
                "the backward of activation '", *activation, "'; call it with save_for_backward=True "
                "(batchops.functional does when a gradient is needed)");
    // The output is saved for relu only (backward reads y > 0); the ops take an empty tensor otherwise.
    const Tensor out = output.defined() ? output : at::empty({0}, x.options());
    // Through the dispatcher: the backward op's own Autograd kernel (below) refuses double backward.
    Tensor gi, gw, gb;
    if constexpr (kGrouped) {
      std::tie(gi, gw, gb) = op_handle<GroupedLinearBackwardOp>().call(
          grad_output, x, weight, optional_if_defined(bias), optional_if_defined(group_sizes), out, saved,
          name_view(activation), mask, group_offsets);
    } else {
      std::tie(gi, gw, gb) = op_handle<LinearBackwardOp>().call(grad_output, x, weight, optional_if_defined(bias),
                                                                out, saved, name_view(activation), mask);
    }
    return {requested(gi, mask[0]), requested(gw, mask[1]), requested(gb, mask[2])};
  }

  // After the forward op ran: what backward needs.
  void save(const Tensor& x, const Tensor& w, const OptTensor& b, OptName act, bool save_for_backward_,
            const Tensor& y, const Tensor& derivative) {
    input = SavedVariable(x, false);
    weight = SavedVariable(w, false);
    bias = SavedVariable(value_or_undefined(b), false);
    activation = name_string(act);
    save_for_backward = save_for_backward_;
    // The output has this node as its grad_fn: saved as an output, so the node does not own
    // itself through it. `saved` (the activation's derivative, or empty) has no grad_fn.
    if (kind(activation) == Activation::kReLU) output = SavedOutput(y, true);
    saved = SavedVariable(derivative, false);
  }

  SavedVariable input, weight, bias, saved, group_sizes, group_offsets;
  SavedOutput output;
  std::optional<std::string> activation;
  bool save_for_backward = true;
};

std::tuple<Tensor, Tensor> linear_forward_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                                   OptName activation, bool save_for_backward) {
  auto node = node_for<LinearBackwardNode<false>>(LinearForwardOp::name, input, weight, bias);
  auto [output, saved] = call_below_autograd<LinearForwardOp>(input, weight, bias, activation, save_for_backward);
  if (node) {
    set_history(output, node);
    node->save(input, weight, bias, activation, save_for_backward, output, saved);
  }
  return {output, saved};
}

std::tuple<Tensor, Tensor, Tensor> grouped_linear_forward_autograd(const Tensor& input, const Tensor& weight,
                                                                   const OptTensor& bias, const OptTensor& group_sizes,
                                                                   OptName activation, bool save_for_backward) {
  auto node = node_for<LinearBackwardNode<true>>(GroupedLinearForwardOp::name, input, weight, bias);
  auto [output, saved, offsets] =
      call_below_autograd<GroupedLinearForwardOp>(input, weight, bias, group_sizes, activation, save_for_backward);
  if (node) {
    set_history(output, node);
    node->save(input, weight, bias, activation, save_for_backward, output, saved);
    node->group_sizes = SavedVariable(value_or_undefined(group_sizes), false);
    // The device offsets too: backward then neither uploads host sizes nor sums device sizes again.
    node->group_offsets = SavedVariable(offsets, false);
  }
  return {output, saved, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  impl_op<LinearForwardOp>(m, &linear_forward_autograd);
  impl_op<GroupedLinearForwardOp>(m, &grouped_linear_forward_autograd);
  impl_op<LinearBackwardOp>(m, &NoDoubleBackwardKernel<LinearBackwardOp>::call);
  impl_op<GroupedLinearBackwardOp>(m, &NoDoubleBackwardKernel<GroupedLinearBackwardOp>::call);
}

}  // namespace batchops
