// Autograd for gather_rows, in C++ (the Autograd dispatch key, both devices); why C++:
// common/autograd.h.
//
// out[i] = input[index[i]] (or the fill row where index[i] = -1). Its gradient is the reverse
// map: with inverse_index (input row -> output row or -1, the exact inverse of an injective
// index) it is one more gather_rows with the two maps swapped, itself differentiable, so double
// backward works; otherwise (repeats allowed) a scatter-add in which the fill rows contribute
// nothing (their gradient is dropped, whatever its value).
#include <ATen/ops/index_add.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>

#include "common/autograd.h"
#include "packing/packing.h"

namespace batchops {
namespace {

using namespace batchops::autograd;

struct GatherRowsFunction : public torch::autograd::Function<GatherRowsFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& index,
                               const OptTensor& inverse_index, const c10::Scalar& fill) {
    Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      output = op_handle<GatherRowsOp>().call(input, index, inverse_index, fill);
    }
    ctx->save_for_backward({index, value_or_undefined(inverse_index)});
    ctx->saved_data["input_rows"] = input.sym_size(0);  // symbolic under torch.compile
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(4);
    const Tensor& grad = grads[0];
    if (!ctx->needs_input_grad(0)) return result;  // input is edge 0
    const auto s = ctx->get_saved_variables();
    const Tensor &index = s[0], &inverse_index = s[1];
    if (inverse_index.defined()) {
      result[0] = op_handle<GatherRowsOp>().call(grad, inverse_index, index, 0);
    } else {
      auto sizes = grad.sym_sizes().vec();
      sizes[0] = ctx->saved_data["input_rows"].toSymInt();
      std::vector<c10::SymInt> mask_shape(grad.dim(), 1);
      mask_shape[0] = index.sym_size(0);
      // Fill rows (index -1) are left out: their gradient is replaced by zeros, not multiplied
      // by zero, so a NaN or inf in a padding slot's gradient cannot reach input row 0.
      const Tensor fill_rows = index.lt(0).reshape_symint(mask_shape);
      result[0] = at::zeros_symint(sizes, grad.options())
                      .index_add(0, index.clamp_min(0), grad.masked_fill(fill_rows, 0));
    }
    return result;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  impl_op<GatherRowsOp>(m, &FunctionKernel<GatherRowsFunction, GatherRowsOp::Sig>::call);
}

}  // namespace batchops
