// The memory format an op's kernels work in (and its outputs keep), shared by the plans:
// channels-last(-3d) when the tensor is laid out that way and not also plainly contiguous, else
// contiguous. batchops/ops/common.py's kernel_memory_format is the same rule for the fake kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace batchops {

inline at::MemoryFormat choose_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

}  // namespace batchops
