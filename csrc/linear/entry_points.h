// The four linear ops' entry points, written once for both devices: device guard, check and
// plan (plan.cpp), the device's kernels. A device supplies only those, as a struct:
//
//   struct CpuLinear {
//     using Guard = NoDeviceGuard;
//     static std::tuple<at::Tensor, at::Tensor> forward(LinearPlan& p);                  // output, saved
//     static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(LinearBackwardPlan& b);  // grads
//   };
//   TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_linear_ops<CpuLinear>(m); }
#pragma once

#include <torch/library.h>

#include "common/op.h"
#include "linear/linear.h"

namespace batchops {

template <typename Device>
struct LinearEntryPoints {
  using Guard = typename Device::Guard;

  static std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           std::optional<c10::string_view> activation,
                                                           bool save_for_backward) {
    Guard guard(input.device());
    auto p = plan_linear(input, weight, bias, activation);
    p.save_for_backward = save_for_backward;
    return Device::forward(p);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& output, const at::Tensor& saved,
      std::optional<c10::string_view> activation, std::array<bool, 3> output_mask) {
    Guard guard(input.device());
    auto b = plan_linear_backward(grad_output, input, weight, bias, std::nullopt, output, saved, activation,
                                  output_mask, /*grouped=*/false);
    return Device::backward(b);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_forward(
      const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& group_sizes, std::optional<c10::string_view> activation,
      bool save_for_backward) {
    Guard guard(input.device());
    auto p = plan_grouped_linear(input, weight, bias, group_sizes, activation);
    p.save_for_backward = save_for_backward;
    auto [output, saved] = Device::forward(p);
    return {output, saved, plan_group_offsets(p)};  // made by Forward where it needed them
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_sizes, const at::Tensor& output,
      const at::Tensor& saved, std::optional<c10::string_view> activation, std::array<bool, 3> output_mask,
      const std::optional<at::Tensor>& group_offsets) {
    Guard guard(input.device());
    auto b = plan_linear_backward(grad_output, input, weight, bias, group_sizes, output, saved, activation,
                                  output_mask, /*grouped=*/true, group_offsets);
    return Device::backward(b);
  }
};

template <typename Device>
void register_linear_ops(torch::Library& m) {
  using Entry = LinearEntryPoints<Device>;
  impl_op<LinearForwardOp>(m, &Entry::linear_forward);
  impl_op<LinearBackwardOp>(m, &Entry::linear_backward);
  impl_op<GroupedLinearForwardOp>(m, &Entry::grouped_linear_forward);
  impl_op<GroupedLinearBackwardOp>(m, &Entry::grouped_linear_backward);
}

}  // namespace batchops
