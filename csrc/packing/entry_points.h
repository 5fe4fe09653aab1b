// gather_rows' entry point, written once for both devices: device guard, check and plan
// (plan.cpp), the device's kernel. A device supplies only the kernel, as a struct:
//
//   struct CpuPacking {
//     using Guard = NoDeviceGuard;
//     static void gather_rows(GatherRowsPlan& p);  // fills p.output (never called when it is empty)
//   };
//   TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_packing_ops<CpuPacking>(m); }
#pragma once

#include <torch/library.h>

#include "common/op.h"
#include "packing/packing.h"

namespace batchops {

template <typename Device>
struct PackingEntryPoints {
  static at::Tensor gather_rows(const at::Tensor& input, const at::Tensor& index,
                                const std::optional<at::Tensor>& inverse_index, const at::Scalar& fill) {
    typename Device::Guard guard(input.device());
    auto p = plan_gather_rows(input, index, inverse_index, fill);
    if (p.output.numel() > 0) Device::gather_rows(p);
    return p.output;
  }
};

template <typename Device>
void register_packing_ops(torch::Library& m) {
  impl_op<GatherRowsOp>(m, &PackingEntryPoints<Device>::gather_rows);
}

}  // namespace batchops
