// The batch-norm ops' schemas (batch_norm.h says them; common/op.h says how).
#include <torch/library.h>

#include "batch_norm/batch_norm.h"
#include "common/op.h"

TORCH_LIBRARY_FRAGMENT(batchops, m) {
  batchops::define_op<batchops::BatchNormForwardOp>(m);
  batchops::define_op<batchops::BatchNormBackwardOp>(m);
  batchops::define_op<batchops::BatchNormStatsOp>(m);
  batchops::define_op<batchops::BatchNormBackwardElemtOp>(m);
}
