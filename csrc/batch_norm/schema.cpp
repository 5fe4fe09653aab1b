// The batch-norm ops' schemas (batch_norm.h says them; common/op.h says how).
#include <torch/library.h>

#include "batch_norm/batch_norm.h"
#include "common/op.h"

// Forward and backward take any layout (plan.cpp computes in channels-last when the input is
// laid out so, else contiguous): flexible_layout lets inductor pass its channels-last
// convolution outputs as they are. Without it a compiled NCHW resnet18 step copied every
// batch norm's input to NCHW and its output back (benchmarks/results/compile/).
TORCH_LIBRARY_FRAGMENT(batchops, m) {
  batchops::define_op<batchops::BatchNormForwardOp>(m, {at::Tag::flexible_layout});
  batchops::define_op<batchops::BatchNormBackwardOp>(m, {at::Tag::flexible_layout});
  batchops::define_op<batchops::BatchNormStatsOp>(m);
  batchops::define_op<batchops::BatchNormBackwardElemtOp>(m);
}
