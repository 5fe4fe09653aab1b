// Host-side helpers the CUDA files share (include from .cu files only).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace batchops {

// An optional tensor's data, or null when it is undefined (no weight, no bias, ...).
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Blocks of `threads` for a grid-stride loop over n elements: one element per thread up to
// blocks_per_sm blocks on every SM of the current device, at least one block.
inline unsigned grid_stride_blocks(int64_t n, int64_t threads, int64_t blocks_per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * blocks_per_sm)));
}

}  // namespace batchops
