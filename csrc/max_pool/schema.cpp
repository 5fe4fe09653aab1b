// The max pool ops' schemas (max_pool.h says them; common/op.h says how).
#include <torch/library.h>

#include "common/op.h"
#include "max_pool/max_pool.h"

TORCH_LIBRARY_FRAGMENT(batchops, m) {
  batchops::define_op<batchops::MaxPool2dOp>(m);
  batchops::define_op<batchops::MaxPool2dBackwardOp>(m);
}
