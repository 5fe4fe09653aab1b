// Helpers the CUDA files share (include from .cu files only).
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

// a / b and a % b for non-negative indices, in 32-bit arithmetic when both fit. A GPU has no
// 64-bit integer divide (the compiler emits a long sequence for it), and the elementwise kernels
// divide per element to find a value's channel, row or window; the branch goes the same way for
// every thread of a tensor under 2^32 elements.
__host__ __device__ inline int64_t index_div(int64_t a, int64_t b) {
  return ((a | b) >> 32) == 0 ? int64_t(uint32_t(a) / uint32_t(b)) : a / b;
}
__host__ __device__ inline int64_t index_mod(int64_t a, int64_t b) {
  return ((a | b) >> 32) == 0 ? int64_t(uint32_t(a) % uint32_t(b)) : a % b;
}

// Blocks of `threads` for a grid-stride loop over n elements: one element per thread up to
// blocks_per_sm blocks on every SM of the current device, at least one block.
inline unsigned grid_stride_blocks(int64_t n, int64_t threads, int64_t blocks_per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * blocks_per_sm)));
}

}  // namespace batchops
