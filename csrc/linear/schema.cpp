// The linear ops' schemas (linear.h says them; common/op.h says how).
#include <torch/library.h>

#include "common/op.h"
#include "linear/linear.h"

TORCH_LIBRARY_FRAGMENT(batchops, m) {
  batchops::define_op<batchops::LinearForwardOp>(m);
  batchops::define_op<batchops::LinearBackwardOp>(m);
  batchops::define_op<batchops::GroupedLinearForwardOp>(m);
  batchops::define_op<batchops::GroupedLinearBackwardOp>(m);
}
