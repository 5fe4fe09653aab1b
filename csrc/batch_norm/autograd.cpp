// Autograd for batch_norm_forward / batch_norm_backward, in C++ (the Autograd dispatch key, both
// devices); why C++: common/autograd.h. Measured on the CPU (BatchNorm2d forward + backward,
// 8x64x7x7 float32): 0.17 ms with torch.library.register_autograd, torch 0.09 ms.
//
// Only the output is differentiable: backward takes no gradients of the statistics
// (save_mean, save_invstd, the new running stats), so they are marked non-differentiable and
// a loss built on them raises instead of silently getting none. batch_norm_stats and
// batch_norm_backward_elemt (SyncBatchNorm) run inside SyncBatchNorm's own autograd.Function and
// have no autograd of their own.
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>

#include "batch_norm/batch_norm.h"
#include "common/autograd.h"

namespace batchops {
namespace {

using namespace batchops::autograd;
using Mask = std::array<bool, 4>;

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static constexpr size_t kInputs = 11;  // the forward op's arguments

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double momentum,
                               const OptTensor& momentum_tensor, double eps, std::optional<std::string> activation) {
    Tensor output, save_mean, save_invstd, new_running_mean, new_running_var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, save_mean, save_invstd, new_running_mean, new_running_var) =
          op_handle<BatchNormForwardOp>().call(input, weight, bias, residual, running_mean, running_var, training,
                                               momentum, momentum_tensor, eps, name_view(activation));
    }
    ctx->save_for_backward({input, value_or_undefined(weight), value_or_undefined(bias),
                            value_or_undefined(residual), save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = name_ivalue(activation);
    ctx->mark_non_differentiable({save_mean, save_invstd, new_running_mean, new_running_var});
    // ... and autograd must not zero-fill a gradient for each of them every backward.
    ctx->set_materialize_grads(false);
    return {output, save_mean, save_invstd, new_running_mean, new_running_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    const auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &weight = s[1], &bias = s[2], &residual = s[3], &save_mean = s[4],
                 &save_invstd = s[5];
    // The four differentiable inputs come first; each absent one (saved undefined) has no edge.
    InputEdges edges;
    const Mask mask = {needs_grad(ctx, edges.add(input)), needs_grad(ctx, edges.add(weight)),
                       needs_grad(ctx, edges.add(bias)), needs_grad(ctx, edges.add(residual))};
    variable_list result(kInputs);
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return result;
    const bool training = ctx->saved_data["training"].toBool();
    const auto act = saved_name(ctx, "activation");
    // Without an activation the residual's gradient is grad_output itself: handed on as torch's
    // add backward does, not copied by the kernel (a full-size write saved).
    const bool residual_grad_is_grad_output = mask[3] && !act.has_value();
    Mask op_mask = mask;
    if (residual_grad_is_grad_output) op_mask[3] = false;
    if (op_mask[0] || op_mask[1] || op_mask[2] || op_mask[3]) {
      // Through the dispatcher: the backward op's own Autograd kernel (below) refuses double backward.
      auto [gi, gw, gb, gr] = op_handle<BatchNormBackwardOp>().call(
          grad_output, input, optional_if_defined(weight), optional_if_defined(bias), optional_if_defined(residual),
          save_mean, save_invstd, training, name_view(act), op_mask);
      const Tensor g[4] = {gi, gw, gb, gr};
      for (size_t i = 0; i < 4; ++i) result[i] = requested(g[i], op_mask[i]);
    }
    if (residual_grad_is_grad_output) result[3] = grad_output;
    return result;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  impl_op<BatchNormForwardOp>(m, &FunctionKernel<BatchNormFunction, BatchNormForwardOp::Sig>::call);
  impl_op<BatchNormBackwardOp>(m, &NoDoubleBackwardKernel<BatchNormBackwardOp>::call);
}

}  // namespace batchops
