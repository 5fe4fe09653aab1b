// max_pool2d_by_weight_sign (max_pool.h says what and why), both devices: composed of
// max_pool2d and ATen's elementwise ops, so it has no kernel of its own to port.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/op.h"
#include "max_pool/max_pool.h"

namespace batchops {
namespace {

std::tuple<at::Tensor, at::Tensor> max_pool2d_by_weight_sign(const at::Tensor& input,
                                                             const std::optional<at::Tensor>& weight,
                                                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                                             bool ceil_mode) {
  const auto& pool = op_handle<MaxPool2dOp>();
  if (weight.has_value() && weight->defined() && input.dim() >= 3) {
    const int64_t channel_dim = input.dim() - 3;
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == input.size(channel_dim),
                "batchops.max_pool2d_by_weight_sign: weight must have one value per channel (", input.size(channel_dim),
                "), got shape ", weight->sizes());
    const at::Tensor flip = weight->lt(0);
    if (flip.any().item<bool>()) {  // rare: pool -x on those channels, then flip back
      std::vector<int64_t> shape(input.dim(), 1);
      shape[channel_dim] = input.size(channel_dim);
      const at::Tensor sign = flip.to(input.scalar_type()).mul(-2).add(1).view(shape);
      auto [pooled, indices] = pool.call(input.mul(sign), kernel_size, stride, padding, dilation, ceil_mode);
      return {pooled.mul(sign), indices};
    }
  }
  return pool.call(input, kernel_size, stride, padding, dilation, ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CPU, m) { impl_op<MaxPool2dByWeightSignOp>(m, &max_pool2d_by_weight_sign); }
TORCH_LIBRARY_IMPL(batchops, CUDA, m) { impl_op<MaxPool2dByWeightSignOp>(m, &max_pool2d_by_weight_sign); }

}  // namespace batchops
