#include "packing/packing.h"
#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

namespace batchops {

GatherRowsPlan plan_gather_rows(const at::Tensor& input, const at::Tensor& index,
                                const std::optional<at::Tensor>& inverse_index, const at::Scalar& fill) {
  constexpr const char* op = "batchops.gather_rows";
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension (rows, *), got a 0-d tensor");
  TORCH_CHECK(index.dim() == 1, op, ": index must be 1-D, got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  check_same_device(op, "index", index, input);
  if (inverse_index.has_value() && inverse_index->defined()) {
    TORCH_CHECK(inverse_index->dim() == 1 && inverse_index->numel() == input.size(0), op,
                ": inverse_index must be 1-D with one entry per input row (", input.size(0), "), got shape ",
                inverse_index->sizes());
  }
  GatherRowsPlan p;
  p.input = input.contiguous();
  p.index = index.contiguous();
  p.in_rows = input.size(0);
  p.out_rows = index.numel();
  auto out_sizes = input.sizes().vec();
  out_sizes[0] = p.out_rows;
  p.output = at::empty(out_sizes, input.options());
  const int64_t row_elems = p.in_rows > 0 ? input.numel() / p.in_rows : c10::multiply_integers(input.sizes().slice(1));
  p.row_bytes = row_elems * static_cast<int64_t>(input.element_size());
  p.fill_row = at::full({row_elems}, fill, input.options());
  return p;
}

}  // namespace batchops
