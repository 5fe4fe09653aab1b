// The four batch-norm ops' entry points, written once for both devices: device guard, check
// and plan (plan.cpp), the device's kernel, results (plan.cpp's finish_*). A device supplies
// only its kernels, as a struct:
//
//   struct CpuBatchNorm {
//     using Guard = NoDeviceGuard;
//     static void forward(BatchNormForwardPlan& p);    // fills p's outputs
//     static void backward(BatchNormBackwardPlan& p);  // also runs batch_norm_backward_elemt's plan
//     static void stats(BatchNormStatsPlan& p);
//   };
//   TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_batch_norm_ops<CpuBatchNorm>(m); }
#pragma once

#include <torch/library.h>

#include "batch_norm/batch_norm.h"
#include "common/op.h"

namespace batchops {

template <typename Device>
struct BatchNormEntryPoints {
  using Guard = typename Device::Guard;

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var, bool training, double momentum,
      const std::optional<at::Tensor>& momentum_tensor, double eps, std::optional<c10::string_view> activation) {
    Guard guard(input.device());
    auto p = plan_batch_norm_forward(input, weight, bias, residual, running_mean, running_var, training, momentum,
                                     momentum_tensor, eps, activation);
    Device::forward(p);
    return finish_batch_norm_forward(p);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& save_mean,
      const at::Tensor& save_invstd, bool training, std::optional<c10::string_view> activation,
      std::array<bool, 4> output_mask) {
    Guard guard(input.device());
    auto p = plan_batch_norm_backward(grad_output, input, weight, bias, residual, save_mean, save_invstd, training,
                                      activation, output_mask);
    Device::backward(p);
    return finish_batch_norm_backward(p);
  }

  static std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input) {
    Guard guard(input.device());
    auto p = plan_batch_norm_stats(input);
    Device::stats(p);
    return {p.mean, p.m2};
  }

  static std::tuple<at::Tensor, at::Tensor> backward_elemt(
      const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& save_mean,
      const at::Tensor& save_invstd, const at::Tensor& mean_g, const at::Tensor& mean_gxhat,
      std::optional<c10::string_view> activation, std::array<bool, 2> output_mask) {
    Guard guard(input.device());
    auto p = plan_batch_norm_backward_elemt(grad_output, input, weight, bias, residual, save_mean, save_invstd, mean_g,
                                            mean_gxhat, activation, output_mask);
    Device::backward(p);
    auto out = finish_batch_norm_backward(p);
    return {std::get<0>(out), std::get<3>(out)};
  }
};

template <typename Device>
void register_batch_norm_ops(torch::Library& m) {
  using Entry = BatchNormEntryPoints<Device>;
  impl_op<BatchNormForwardOp>(m, &Entry::forward);
  impl_op<BatchNormBackwardOp>(m, &Entry::backward);
  impl_op<BatchNormStatsOp>(m, &Entry::stats);
  impl_op<BatchNormBackwardElemtOp>(m, &Entry::backward_elemt);
}

}  // namespace batchops
