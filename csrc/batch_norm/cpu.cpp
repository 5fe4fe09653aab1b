// Batch norm on the CPU: the kernels the shared entry points (entry_points.h) run. They live
// in cpu_kernels.h, compiled for the baseline here and for AVX2 / AVX-512 in cpu_avx2.cpp /
// cpu_avx512.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "batch_norm/batch_norm.h"
#include "batch_norm/entry_points.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"

#define BATCHOPS_CPU_NS cpu_default
#include "batch_norm/cpu_kernels.h"
#undef BATCHOPS_CPU_NS

namespace batchops {

#if BATCHOPS_CPU_VARIANTS
namespace cpu_avx2 {
void batch_norm_stats_kernel(BatchNormStatsPlan& p);
void batch_norm_forward_kernel(BatchNormForwardPlan& p);
void batch_norm_backward_kernel(BatchNormBackwardPlan& p);
}  // namespace cpu_avx2
namespace cpu_avx512 {
void batch_norm_stats_kernel(BatchNormStatsPlan& p);
void batch_norm_forward_kernel(BatchNormForwardPlan& p);
void batch_norm_backward_kernel(BatchNormBackwardPlan& p);
}  // namespace cpu_avx512
#endif

// The kernels for the shared entry points (entry_points.h), each in the build for this CPU.
struct CpuBatchNorm {
  using Guard = NoDeviceGuard;

  static void forward(BatchNormForwardPlan& p) {
    if (p.momentum_tensor.defined()) p.momentum = p.momentum_tensor.item<double>();
    advise_huge_pages(p.output);
    cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(batch_norm_forward_kernel))(p);
  }

  static void backward(BatchNormBackwardPlan& p) {
    advise_huge_pages(p.grad_input);
    advise_huge_pages(p.grad_residual);
    cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(batch_norm_backward_kernel))(p);
  }

  static void stats(BatchNormStatsPlan& p) {
    cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(batch_norm_stats_kernel))(p);
  }
};

TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_batch_norm_ops<CpuBatchNorm>(m); }

}  // namespace batchops
