// Autograd for max_pool2d, in C++ (the Autograd dispatch key, both devices), with a hand-written
// backward node; why: common/autograd.h. The backward keeps the indices and the input's size,
// not the input.
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/autograd.h"
#include "max_pool/max_pool.h"

namespace batchops {
namespace {

using namespace batchops::autograd;

struct MaxPool2dBackwardNode final : public BackwardNode<MaxPool2dBackwardNode> {
  std::string name() const override { return "batchops::MaxPool2dBackward"; }
  auto fields() { return std::tie(indices, input_size, kernel_size, stride, padding, dilation); }

  static variable_list backward(const variable_list& grads, const std::vector<bool>& needed, const Tensor& indices,
                                const std::vector<c10::SymInt>& input_size, const std::vector<int64_t>& kernel_size,
                                const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                const std::vector<int64_t>& dilation) {
    variable_list result(1);
    if (!needed[0] || !grads[0].defined()) return result;
    result[0] =
        op_handle<MaxPool2dBackwardOp>().call(grads[0], indices, input_size, kernel_size, stride, padding, dilation);
    return result;
  }

  SavedVariable indices;
  std::vector<c10::SymInt> input_size;  // symbolic under torch.compile
  std::vector<int64_t> kernel_size, stride, padding, dilation;
};

std::tuple<Tensor, Tensor> max_pool2d_autograd(const Tensor& input, at::IntArrayRef kernel_size,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, bool ceil_mode) {
  auto node = node_for<MaxPool2dBackwardNode>(MaxPool2dOp::name, input);
  auto [output, indices] = call_below_autograd<MaxPool2dOp>(input, kernel_size, stride, padding, dilation, ceil_mode);
  if (node) {
    set_history(output, node);
    // The indices (no grad_fn) and the input's size, not the input.
    node->indices = SavedVariable(indices, false);
    node->input_size = input.sym_sizes().vec();
    node->kernel_size = kernel_size.vec();
    node->stride = stride.vec();
    node->padding = padding.vec();
    node->dilation = dilation.vec();
  }
  return {output, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  impl_op<MaxPool2dOp>(m, &max_pool2d_autograd);
  impl_op<MaxPool2dBackwardOp>(m, &NoDoubleBackwardKernel<MaxPool2dBackwardOp>::call);
  impl_op<MaxPool2dBatchNormBackwardOp>(m, &NoDoubleBackwardKernel<MaxPool2dBatchNormBackwardOp>::call);
}

}  // namespace batchops
