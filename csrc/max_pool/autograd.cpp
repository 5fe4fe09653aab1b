// Autograd for max_pool2d, in C++ (the Autograd dispatch key, both devices); why C++:
// common/autograd.h. The backward keeps the indices and the input's size, not the input.
#include <torch/library.h>

#include "common/autograd.h"
#include "max_pool/max_pool.h"

namespace batchops {
namespace {

using namespace batchops::autograd;

struct MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool ceil_mode) {
    Tensor output, indices;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, indices) =
          op_handle<MaxPool2dOp>().call(input, kernel_size, stride, padding, dilation, ceil_mode);
    }
    ctx->save_for_backward({indices});
    ctx->saved_data["input_size"] = input.sym_sizes();  // symbolic under torch.compile
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->mark_non_differentiable({indices});
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);
    if (!ctx->needs_input_grad(0) || !grads[0].defined()) return result;
    const auto window = [&](const char* key) { return ctx->saved_data[key].toIntVector(); };
    result[0] = op_handle<MaxPool2dBackwardOp>().call(grads[0], ctx->get_saved_variables()[0],
                                                      ctx->saved_data["input_size"].toSymIntVector(),
                                                      window("kernel_size"), window("stride"), window("padding"),
                                                      window("dilation"));
    return result;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  impl_op<MaxPool2dOp>(m, &FunctionKernel<MaxPool2dFunction, MaxPool2dOp::Sig>::call);
  impl_op<MaxPool2dBackwardOp>(m, &NoDoubleBackwardKernel<MaxPool2dBackwardOp>::call);
}

}  // namespace batchops
