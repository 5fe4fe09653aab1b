// Row gather on CUDA: threads copy rows in the widest unit (16, 8, 4, 2 or 1 bytes) that the
// row size and the base pointers allow, so token rows move as vector loads/stores.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.h"
#include "packing/entry_points.h"
#include "packing/packing.h"

namespace batchops {
namespace {

template <typename unit_t>
__global__ void gather_rows_kernel(const unit_t* __restrict__ src, const unit_t* __restrict__ fill_row,
                                   const int64_t* __restrict__ index, unit_t* __restrict__ dst, int64_t out_rows,
                                   int64_t in_rows, int64_t units_per_row) {
  const int64_t total = out_rows * units_per_row;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < total; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = index_div(u, units_per_row);
    const int64_t k = u - row * units_per_row;
    const int64_t r = index[row];
    CUDA_KERNEL_ASSERT(r < in_rows && r >= -1);
    dst[u] = r >= 0 ? src[r * units_per_row + k] : fill_row[k];
  }
}

template <typename unit_t>
void launch(const GatherRowsPlan& p) {
  const int64_t units_per_row = p.row_bytes / int64_t(sizeof(unit_t));
  const int64_t total = p.out_rows * units_per_row;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, int64_t(sms) * 16));
  gather_rows_kernel<unit_t><<<static_cast<unsigned>(blocks), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const unit_t*>(p.input.const_data_ptr()), static_cast<const unit_t*>(p.fill_row.const_data_ptr()),
      p.index.const_data_ptr<int64_t>(), static_cast<unit_t*>(p.output.mutable_data_ptr()), p.out_rows, p.in_rows,
      units_per_row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_rows_cuda(GatherRowsPlan& p) {
  // The widest unit dividing the row size and every base address.
  const auto addresses = reinterpret_cast<uintptr_t>(p.input.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(p.fill_row.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(p.output.const_data_ptr()) | static_cast<uintptr_t>(p.row_bytes);
  if (addresses % 16 == 0) {
    launch<uint4>(p);
  } else if (addresses % 8 == 0) {
    launch<uint2>(p);
  } else if (addresses % 4 == 0) {
    launch<uint32_t>(p);
  } else if (addresses % 2 == 0) {
    launch<uint16_t>(p);
  } else {
    launch<uint8_t>(p);
  }
}

// The kernel for the shared entry point (entry_points.h).
struct CudaPacking {
  using Guard = c10::cuda::CUDAGuard;
  static void gather_rows(GatherRowsPlan& p) { gather_rows_cuda(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CUDA, m) { register_packing_ops<CudaPacking>(m); }

}  // namespace batchops
