// The packing op's schema (packing.h says it; common/op.h says how).
#include <torch/library.h>

#include "common/op.h"
#include "packing/packing.h"

TORCH_LIBRARY_FRAGMENT(batchops, m) { batchops::define_op<batchops::GatherRowsOp>(m); }
