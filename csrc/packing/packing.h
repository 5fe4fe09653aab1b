// Padded <-> packed sequences as one row gather: out[i] = index[i] >= 0 ? input[index[i]] : fill,
// where a "row" is one token's features (any trailing shape, any dtype: rows are copied as
// bytes). Packing gathers the valid rows of the padded tensor; padding gathers packed rows
// into the padded grid with -1 (fill) for padding slots; each is the other's backward.
// The index maps are computed in Python with prefix sums on the data's device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>

#include <optional>

namespace batchops {

// The op (common/op.h): name, schema and C++ signature, said once. schema.cpp defines it,
// entry_points.h implements it for both devices, autograd.cpp adds the Autograd kernel and
// batchops/ops/packing.py the fake one.
// out[i] = index[i] >= 0 ? input[index[i]] : fill, rows = input's first dimension.
// inverse_index (input row -> output row or -1) is not read by the kernel: autograd uses it
// to make the backward one more gather instead of a scatter-add.
struct GatherRowsOp {
  static constexpr const char* name = "gather_rows";
  static constexpr const char* schema =
      "gather_rows(Tensor input, Tensor index, Tensor? inverse_index, Scalar fill) -> Tensor";
  using Sig = at::Tensor(const at::Tensor& input, const at::Tensor& index,
                         const std::optional<at::Tensor>& inverse_index, const at::Scalar& fill);
};

struct GatherRowsPlan {
  at::Tensor input;  // contiguous, viewed as (rows, row_bytes)
  at::Tensor index;  // contiguous int64
  at::Tensor fill_row;  // one row of the fill value, row_bytes long
  at::Tensor output;
  int64_t in_rows = 0, out_rows = 0, row_bytes = 0;
};

GatherRowsPlan plan_gather_rows(const at::Tensor& input, const at::Tensor& index,
                                const std::optional<at::Tensor>& inverse_index, const at::Scalar& fill);

}  // namespace batchops
