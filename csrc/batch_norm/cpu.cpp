// Batch norm on the CPU: the op entry points. The kernels live in cpu_kernels.h, compiled
// for the baseline here and for AVX2 / AVX-512 in cpu_avx2.cpp / cpu_avx512.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "batch_norm/batch_norm.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"

#define BATCHOPS_CPU_NS cpu_default
#include "batch_norm/cpu_kernels.h"
#undef BATCHOPS_CPU_NS

namespace batchops {

#if BATCHOPS_CPU_VARIANTS
namespace cpu_avx2 {
void batch_norm_stats_kernel(BatchNormStatsPlan& p);
void batch_norm_forward_kernel(BatchNormForwardPlan& p);
void batch_norm_backward_kernel(BatchNormBackwardPlan& p);
}  // namespace cpu_avx2
namespace cpu_avx512 {
void batch_norm_stats_kernel(BatchNormStatsPlan& p);
void batch_norm_forward_kernel(BatchNormForwardPlan& p);
void batch_norm_backward_kernel(BatchNormBackwardPlan& p);
}  // namespace cpu_avx512
#endif

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum,
    const std::optional<at::Tensor>& momentum_tensor, double eps, std::optional<c10::string_view> activation) {
  auto p = plan_batch_norm_forward(input, weight, bias, residual, running_mean, running_var, training, momentum,
                                   momentum_tensor, eps, activation);
  if (p.momentum_tensor.defined()) p.momentum = p.momentum_tensor.item<double>();
  advise_huge_pages(p.output);
  cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(batch_norm_forward_kernel))(p);
  return finish_batch_norm_forward(p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, std::optional<c10::string_view> activation,
    std::array<bool, 4> output_mask) {
  auto p = plan_batch_norm_backward(grad_output, input, weight, bias, residual, save_mean, save_invstd, training,
                                    activation, output_mask);
  advise_huge_pages(p.grad_input);
  advise_huge_pages(p.grad_residual);
  cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(batch_norm_backward_kernel))(p);
  return finish_batch_norm_backward(p);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  auto p = plan_batch_norm_stats(input);
  cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(batch_norm_stats_kernel))(p);
  return {p.mean, p.m2};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, const at::Tensor& mean_g, const at::Tensor& mean_gxhat,
    std::optional<c10::string_view> activation, std::array<bool, 2> output_mask) {
  auto p = plan_batch_norm_backward_elemt(grad_output, input, weight, bias, residual, save_mean, save_invstd, mean_g,
                                          mean_gxhat, activation, output_mask);
  advise_huge_pages(p.grad_input);
  advise_huge_pages(p.grad_residual);
  cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(batch_norm_backward_kernel))(p);
  auto out = finish_batch_norm_backward(p);
  return {std::get<0>(out), std::get<3>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
}

}  // namespace batchops
