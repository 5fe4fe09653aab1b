// max_pool2d's entry points, written once for both devices: device guard, check and plan
// (plan.cpp), the device's kernel. A device supplies only the kernels, as a struct:
//
//   struct CpuMaxPool {
//     using Guard = NoDeviceGuard;
//     static void forward(MaxPool2dPlan& p);   // fills p.output and p.indices
//     static void backward(MaxPool2dPlan& p);  // fills p.grad_input (zeros where no index points),
//                                              // then applies p.bn_coefficients where set
//   };
//   TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_max_pool_ops<CpuMaxPool>(m); }
//
// Neither kernel is called when its result is empty.
#pragma once

#include <torch/library.h>

#include "common/op.h"
#include "max_pool/max_pool.h"

namespace batchops {

template <typename Device>
struct MaxPoolEntryPoints {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, bool ceil_mode) {
    typename Device::Guard guard(input.device());
    auto p = plan_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
    if (p.output.numel() > 0) Device::forward(p);
    return {p.output, p.indices};
  }

  static at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& indices,
                             c10::SymIntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
    typename Device::Guard guard(grad_output.device());
    auto p = plan_max_pool2d_backward(grad_output, indices, C10_AS_INTARRAYREF_SLOW(input_size), kernel_size, stride,
                                      padding, dilation);
    if (p.grad_input.numel() > 0) Device::backward(p);
    return p.grad_input;
  }

  // The same backward with p.bn_input / p.bn_coefficients set: the device applies them.
  static at::Tensor batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                        const at::Tensor& input, const at::Tensor& coefficients,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation) {
    typename Device::Guard guard(grad_output.device());
    auto p = plan_max_pool2d_batch_norm_backward(grad_output, indices, input, coefficients, kernel_size, stride,
                                                 padding, dilation);
    if (p.grad_input.numel() > 0) Device::backward(p);
    return p.grad_input;
  }
};

template <typename Device>
void register_max_pool_ops(torch::Library& m) {
  impl_op<MaxPool2dOp>(m, &MaxPoolEntryPoints<Device>::forward);
  impl_op<MaxPool2dBackwardOp>(m, &MaxPoolEntryPoints<Device>::backward);
  impl_op<MaxPool2dBatchNormBackwardOp>(m, &MaxPoolEntryPoints<Device>::batch_norm_backward);
}

}  // namespace batchops
