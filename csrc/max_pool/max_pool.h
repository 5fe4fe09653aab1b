// 2-D max pooling, torch's semantics (nn.MaxPool2d / F.max_pool2d): each output is the largest
// value of its window (a NaN wins; among equal values the first in row-major window order), and
// indices give its position as h * W + w within the input plane, as torch's return_indices
// does. Why an op of our own: torch's CPU kernel for contiguous (NCHW) inputs compares one value
// at a time with a branch per value: 12.6 ms for resnet18's stem pool (16x64x56x56) where its
// channels-last kernel takes 0.7 (benchmarks/README.md). The backward scatters each output's
// gradient to its index and needs only the indices and the input's size, so the input itself
// is not kept for it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace batchops {

// The ops (common/op.h). schema.cpp defines them, entry_points.h implements them for both
// devices, autograd.cpp adds the Autograd kernel and batchops/ops/max_pool.py the fake ones.
// Arguments as torch's max_pool2d_with_indices: an empty stride means stride = kernel_size,
// one number means the same for height and width.
struct MaxPool2dOp {
  static constexpr const char* name = "max_pool2d";
  static constexpr const char* schema =
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride=[], int[2] padding=0, int[2] dilation=1, "
      "bool ceil_mode=False) -> (Tensor, Tensor)";
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, bool ceil_mode);
};

// grad_input (input_size, laid out as indices are) = sum of grad_output at each index. The
// window arguments let CUDA gather each input's gradient from the outputs whose windows hold
// it (deterministic, no atomics); the CPU scatters plane by plane and needs only the indices.
struct MaxPool2dBackwardOp {
  static constexpr const char* name = "max_pool2d_backward";
  static constexpr const char* schema =
      "max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor";
  using Sig = at::Tensor(const at::Tensor& grad_output, const at::Tensor& indices, c10::SymIntArrayRef input_size,
                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation);
  static constexpr const char* double_backward_error =
      "batchops.max_pool2d_backward: a gradient of max_pool2d's gradient is not implemented";
};

// max_pool2d on the channels whose weight is >= 0 (or NaN); on those with a negative weight the
// smallest value of each window (the max of -input, negated back): the value batch norm then
// ReLU keep largest, since batch norm's scale has the weight's sign. For resnet's stem in one
// step (batchops/ops/batch_norm_max_pool.py): an op, so that the test for negative weights (a
// host synchronisation) is inside one opaque call under torch.compile. No autograd of its own.
struct MaxPool2dByWeightSignOp {
  static constexpr const char* name = "max_pool2d_by_weight_sign";
  static constexpr const char* schema =
      "max_pool2d_by_weight_sign(Tensor input, Tensor? weight, int[2] kernel_size, int[2] stride=[], "
      "int[2] padding=0, int[2] dilation=1, bool ceil_mode=False) -> (Tensor, Tensor)";
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);
};

// max_pool2d_backward with batch norm's full-size backward pass after it, for a max pool that
// follows a batch norm (resnet's stem: batchops/ops/batch_norm_max_pool.py): with g the input's
// gradient as max_pool2d_backward gives it,
//   grad_input = alpha[c] * g + beta[c] * (input - center[c]) + gamma[c],
// coefficients = (alpha; beta; center; gamma) of shape (4, C), float (double for double input);
// center is the batch's mean (x - mean stays exact where x = mean + small). The gradient is made
// and normalised where it is still in cache (the CPU: a plane or an image at a time; AVX-512
// channels-last: in registers) instead of written full-size and read back by a second pass.
struct MaxPool2dBatchNormBackwardOp {
  static constexpr const char* name = "max_pool2d_batch_norm_backward";
  static constexpr const char* schema =
      "max_pool2d_batch_norm_backward(Tensor grad_output, Tensor indices, Tensor input, Tensor coefficients, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor";
  using Sig = at::Tensor(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& input,
                         const at::Tensor& coefficients, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation);
  static constexpr const char* double_backward_error =
      "batchops.max_pool2d_batch_norm_backward: a gradient of this gradient is not implemented";
};

// One window axis (height or width): output o reads input positions
// o * stride - padding + k * dilation, k < kernel, those inside [0, in).
struct PoolAxis {
  int64_t in = 0, out = 0, kernel = 1, stride = 1, padding = 0, dilation = 1;
};

// Both directions work on (planes, H, W) with planes = N * C, in one of two layouts:
// planar (N, C, H, W contiguous: a plane's values are adjacent) or channels-last
// (N, H, W, C: a pixel's C values are adjacent, and a "plane" is a channel of one image).
struct MaxPool2dPlan {
  at::Tensor input, output, indices;  // forward: input read, output and indices written
  at::Tensor grad_output, grad_input;  // backward: grad_output and indices read, grad_input written
  // max_pool2d_batch_norm_backward only: grad_input = alpha * g + beta * (bn_input - center) +
  // gamma, per channel, bn_coefficients (4, C) contiguous in the statistics' dtype; else undefined.
  at::Tensor bn_input, bn_coefficients;
  PoolAxis h, w;
  int64_t batch = 0, channels = 0;
  bool channels_last = false;
};

MaxPool2dPlan plan_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);
MaxPool2dPlan plan_max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                       at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation);
MaxPool2dPlan plan_max_pool2d_batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                                  const at::Tensor& input, const at::Tensor& coefficients,
                                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation);
// The batch-norm pass as ATen ops on p.grad_input (which holds g): for kernels that leave it.
void apply_batch_norm_coefficients(MaxPool2dPlan& p);

}  // namespace batchops
