// Autograd for the four linear ops, in C++ (the Autograd dispatch key, both devices); why C++:
// common/autograd.h. Measured: a 64 x 256 -> 256 layer's forward + backward took 0.26 ms with
// torch.library.register_autograd and 0.17-0.22 ms with this (torch: 0.23-0.25 ms); ~1-2% of
// the 8192 x 256 -> 256 benchmark step.
//
// Forward saves input, weight, bias and `saved` (the activation's derivative for silu / gelu*,
// see linear.h), plus the output for relu. `saved` is marked non-differentiable: it is for our
// backward only. Second derivatives are not supported: the backward ops raise when a gradient
// of the gradient is asked for.
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>

#include "common/activation.h"
#include "common/autograd.h"
#include "linear/linear.h"

namespace batchops {
namespace {

using namespace batchops::autograd;
using Mask = std::array<bool, 3>;

Activation kind(const std::optional<std::string>& act) { return parse_activation(name_view(act), "batchops.linear"); }

// Forward's part shared by both Functions, after the op ran: what backward needs besides the
// tensors, and which outputs get gradients.
void save_context(AutogradContext* ctx, const std::optional<std::string>& act, bool save_for_backward,
                  const Tensor& saved) {
  ctx->saved_data["activation"] = name_ivalue(act);
  ctx->saved_data["save_for_backward"] = save_for_backward;
  ctx->mark_non_differentiable({saved});
  // `saved` gets no gradient; without this autograd would hand backward a zero-filled tensor
  // of its full size, one more pass over (rows, out_features) per backward.
  ctx->set_materialize_grads(false);
}

bool relu(const std::optional<std::string>& act) { return kind(act) == Activation::kReLU; }  // backward reads the output

void check_saved(AutogradContext* ctx, const std::optional<std::string>& act) {
  TORCH_CHECK(ctx->saved_data["save_for_backward"].toBool() || !activation_saves_derivative(kind(act)),
              "batchops linear backward: the forward op ran with save_for_backward=False, so it saved nothing for "
              "the backward of activation '", *act, "'; call it with save_for_backward=True (batchops.functional "
              "does when a gradient is needed)");
}

// input and weight are edges 0 and 1; bias, when given, edge 2.
Mask grad_mask(AutogradContext* ctx, bool has_bias) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)};
}

Tensor output_or_empty(const Tensor& output, const Tensor& input) {
  return output.defined() ? output : at::empty({0}, input.options());
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                               std::optional<std::string> activation, bool save_for_backward) {
    Tensor output, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, saved) =
          op_handle<LinearForwardOp>().call(input, weight, bias, name_view(activation), save_for_backward);
    }
    ctx->save_for_backward({input, weight, value_or_undefined(bias), relu(activation) ? output : Tensor(), saved});
    save_context(ctx, activation, save_for_backward, saved);
    return {output, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    const auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &weight = s[1], &bias = s[2], &output = s[3], &saved = s[4];
    const Mask mask = grad_mask(ctx, bias.defined());
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(5);
    const auto act = saved_name(ctx, "activation");
    check_saved(ctx, act);
    const Tensor out = output_or_empty(output, input);
    // Through the dispatcher: the backward op's own Autograd kernel (below) refuses double backward.
    auto [gi, gw, gb] = op_handle<LinearBackwardOp>().call(grad_output, input, weight, optional_if_defined(bias),
                                                           out, saved, name_view(act), mask);
    return {requested(gi, mask[0]), requested(gw, mask[1]), requested(gb, mask[2]), Tensor(), Tensor()};
  }
};

struct GroupedLinearFunction : public torch::autograd::Function<GroupedLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& group_sizes, std::optional<std::string> activation,
                               bool save_for_backward) {
    Tensor output, saved, offsets;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, saved, offsets) =
          op_handle<GroupedLinearForwardOp>().call(input, weight, bias, group_sizes, name_view(activation),
                                                  save_for_backward);
    }
    // The device offsets too: backward then neither uploads host sizes nor sums device sizes again.
    ctx->save_for_backward({input, weight, value_or_undefined(bias), value_or_undefined(group_sizes),
                            relu(activation) ? output : Tensor(), saved, offsets});
    save_context(ctx, activation, save_for_backward, saved);
    ctx->mark_non_differentiable({offsets});
    return {output, saved, offsets};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    const auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &weight = s[1], &bias = s[2], &sizes = s[3], &output = s[4], &saved = s[5],
                 &offsets = s[6];
    const Mask mask = grad_mask(ctx, bias.defined());
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(6);
    const auto act = saved_name(ctx, "activation");
    check_saved(ctx, act);
    const Tensor out = output_or_empty(output, input);
    auto [gi, gw, gb] =
        op_handle<GroupedLinearBackwardOp>().call(grad_output, input, weight, optional_if_defined(bias),
                                                  optional_if_defined(sizes), out, saved, name_view(act), mask, offsets);
    return {requested(gi, mask[0]), requested(gw, mask[1]), requested(gb, mask[2]), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  impl_op<LinearForwardOp>(m, &FunctionKernel<LinearFunction, LinearForwardOp::Sig>::call);
  impl_op<GroupedLinearForwardOp>(m, &FunctionKernel<GroupedLinearFunction, GroupedLinearForwardOp::Sig>::call);
  impl_op<LinearBackwardOp>(m, &NoDoubleBackwardKernel<LinearBackwardOp>::call);
  impl_op<GroupedLinearBackwardOp>(m, &NoDoubleBackwardKernel<GroupedLinearBackwardOp>::call);
}

}  // namespace batchops
