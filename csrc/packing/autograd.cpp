// Autograd for gather_rows, in C++ (the Autograd dispatch key, both devices), with a hand-written
// backward node; why: common/autograd.h.
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
#include <string>
#include <vector>

#include "common/autograd.h"
#include "packing/packing.h"

namespace batchops {
namespace {

using namespace batchops::autograd;

struct GatherRowsBackwardNode final : public BackwardNode<GatherRowsBackwardNode> {
  std::string name() const override { return "batchops::GatherRowsBackward"; }
  auto fields() { return std::tie(index, inverse_index, input_rows); }

  // Runs with grad mode on under create_graph=True: the ops below then build their own nodes.
  static variable_list backward(const variable_list& grads, const std::vector<bool>& needed, const Tensor& index,
                                const Tensor& inverse_index, const c10::SymInt& input_rows) {
    variable_list result(1);
    const Tensor& grad = grads[0];
    if (!needed[0] || !grad.defined()) return result;
    if (inverse_index.defined()) {
      result[0] = op_handle<GatherRowsOp>().call(grad, inverse_index, index, 0);
    } else {
      auto sizes = grad.sym_sizes().vec();
      sizes[0] = input_rows;
      std::vector<c10::SymInt> mask_shape(grad.dim(), 1);
      mask_shape[0] = index.sym_size(0);
      // Fill rows (index -1) are left out: their gradient is replaced by zeros, not multiplied
      // by zero, so a NaN or inf in a padding slot's gradient cannot reach input row 0.
      const Tensor fill_rows = index.lt(0).reshape_symint(mask_shape);
      result[0] =
          at::zeros_symint(sizes, grad.options()).index_add(0, index.clamp_min(0), grad.masked_fill(fill_rows, 0));
    }
    return result;
  }

  SavedVariable index, inverse_index;
  c10::SymInt input_rows;  // symbolic under torch.compile
};

// The index maps take no gradient (integer tensors); only the input has an edge.
Tensor gather_rows_autograd(const Tensor& input, const Tensor& index, const OptTensor& inverse_index,
                            const c10::Scalar& fill) {
  auto node = node_for<GatherRowsBackwardNode>(GatherRowsOp::name, input);
  Tensor output = call_below_autograd<GatherRowsOp>(input, index, inverse_index, fill);
  if (node) {
    set_history(output, node);
    node->index = SavedVariable(index, false);
    node->inverse_index = SavedVariable(value_or_undefined(inverse_index), false);
    node->input_rows = input.sym_size(0);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  impl_op<GatherRowsOp>(m, &gather_rows_autograd);
}

}  // namespace batchops
