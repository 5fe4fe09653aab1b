// The four linear ops' entry points, written once for both devices: check and plan (plan.cpp),
// then the device's forward / backward. cpu.cpp and cuda.cu register
// LinearEntryPoints<their guard, their forward, their backward>.
#pragma once

#include <c10/core/Device.h>

#include "linear/linear.h"

namespace batchops {

// The CPU needs no device guard; CUDA passes c10::cuda::CUDAGuard.
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

using LinearForwardFn = std::tuple<at::Tensor, at::Tensor> (*)(LinearPlan&);
using LinearBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(LinearBackwardPlan&);

template <typename Guard, LinearForwardFn Forward, LinearBackwardFn Backward>
struct LinearEntryPoints {
  static std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           std::optional<c10::string_view> activation,
                                                           bool save_for_backward) {
    Guard guard(input.device());
    auto p = plan_linear(input, weight, bias, activation);
    p.save_for_backward = save_for_backward;
    return Forward(p);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& output, const at::Tensor& saved,
      std::optional<c10::string_view> activation, std::array<bool, 3> output_mask) {
    Guard guard(input.device());
    auto b = plan_linear_backward(grad_output, input, weight, bias, std::nullopt, output, saved, activation,
                                  output_mask, /*grouped=*/false);
    return Backward(b);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_forward(
      const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& group_sizes, std::optional<c10::string_view> activation,
      bool save_for_backward) {
    Guard guard(input.device());
    auto p = plan_grouped_linear(input, weight, bias, group_sizes, activation);
    p.save_for_backward = save_for_backward;
    auto [output, saved] = Forward(p);
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
    return Backward(b);
  }
};

// m.impl for all four ops of one device.
#define BATCHOPS_REGISTER_LINEAR(m, ENTRY)                                   \
  do {                                                                       \
    (m).impl("linear_forward", &ENTRY::linear_forward);                      \
    (m).impl("linear_backward", &ENTRY::linear_backward);                    \
    (m).impl("grouped_linear_forward", &ENTRY::grouped_linear_forward);      \
    (m).impl("grouped_linear_backward", &ENTRY::grouped_linear_backward);    \
  } while (0)

}  // namespace batchops
