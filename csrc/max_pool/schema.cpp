// The max pool ops' schemas (max_pool.h says them; common/op.h says how).
#include <torch/library.h>

#include "common/op.h"
#include "max_pool/max_pool.h"

// Both take any layout (plan.cpp chooses torch's pooling layout), so inductor may pass its
// channels-last tensors as they are (flexible_layout; see batch_norm/schema.cpp).
TORCH_LIBRARY_FRAGMENT(batchops, m) {
  batchops::define_op<batchops::MaxPool2dOp>(m, {at::Tag::flexible_layout});
  batchops::define_op<batchops::MaxPool2dBackwardOp>(m, {at::Tag::flexible_layout});
  batchops::define_op<batchops::MaxPool2dBatchNormBackwardOp>(m, {at::Tag::flexible_layout});
  batchops::define_op<batchops::MaxPool2dByWeightSignOp>(m, {at::Tag::flexible_layout});
}
