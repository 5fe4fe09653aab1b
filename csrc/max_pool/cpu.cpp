// 2-D max pooling on the CPU. The forward (both layouts, compiled per instruction set) is in
// cpu_kernels.h, how it walks the windows in csrc/README.md "Max pool"; this file picks its
// build and holds the backward.
// The backward adds each output's gradient at its index, plane by plane (planar) or image by
// image (channels-last): a thread owns whole planes / images, so no two threads add to the same
// value, and the sums come out the same for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/cpu_isa.h"
#include "max_pool/entry_points.h"
#include "max_pool/max_pool.h"

#define BATCHOPS_CPU_NS cpu_default
#include "max_pool/cpu_kernels.h"
#undef BATCHOPS_CPU_NS

namespace batchops {

#if BATCHOPS_CPU_VARIANTS
namespace cpu_avx2 {
void max_pool2d_forward(MaxPool2dPlan& p);
bool max_pool2d_backward_channels_last(MaxPool2dPlan& p);
}  // namespace cpu_avx2
namespace cpu_avx512 {
void max_pool2d_forward(MaxPool2dPlan& p);
bool max_pool2d_backward_channels_last(MaxPool2dPlan& p);
}  // namespace cpu_avx512
#endif

namespace {

// Indices come from the caller: each is checked before it is written through.
[[noreturn]] C10_NOINLINE void index_error(int64_t index, int64_t plane_size) {
  TORCH_CHECK_INDEX(false, "batchops.max_pool2d_backward: index ", index, " is out of range for an input plane of ",
                    plane_size, " values");
}
inline void check_index(int64_t index, int64_t plane_size) {
  if (C10_UNLIKELY(index < 0 || index >= plane_size)) index_error(index, plane_size);
}

// Accumulates in scalar_t, as torch's CPU backward does (the same sums for reduced dtypes).
template <typename scalar_t>
void backward_planar(MaxPool2dPlan& p) {
  const int64_t planes = p.batch * p.channels, plane_in = p.h.in * p.w.in, plane_out = p.h.out * p.w.out;
  const scalar_t* go = p.grad_output.const_data_ptr<scalar_t>();
  const int64_t* indices = p.indices.const_data_ptr<int64_t>();
  scalar_t* gi = p.grad_input.mutable_data_ptr<scalar_t>();
  const cpu_default::BatchNormPass<scalar_t> bn(p);  // cpu_kernels.h
  const int64_t grain = std::max<int64_t>(1, 16384 / plane_in);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      scalar_t* g = gi + plane * plane_in;
      std::fill(g, g + plane_in, scalar_t(0));
      const scalar_t* dy = go + plane * plane_out;
      const int64_t* idx = indices + plane * plane_out;
      for (int64_t o = 0; o < plane_out; ++o) {
        check_index(idx[o], plane_in);
        g[idx[o]] += dy[o];
      }
      if (bn.x) bn.planar(g, plane * plane_in, plane_in, plane % p.channels);
    }
  });
}

template <typename scalar_t>
void backward_channels_last(MaxPool2dPlan& p) {
  const int64_t C = p.channels, plane_in = p.h.in * p.w.in, plane_out = p.h.out * p.w.out;
  const scalar_t* go = p.grad_output.const_data_ptr<scalar_t>();
  const int64_t* indices = p.indices.const_data_ptr<int64_t>();
  scalar_t* gi = p.grad_input.mutable_data_ptr<scalar_t>();
  const cpu_default::BatchNormPass<scalar_t> bn(p);  // cpu_kernels.h
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* g = gi + n * plane_in * C;
      std::fill(g, g + plane_in * C, scalar_t(0));
      for (int64_t o = 0; o < plane_out; ++o) {
        const scalar_t* dy = go + (n * plane_out + o) * C;
        const int64_t* idx = indices + (n * plane_out + o) * C;
        for (int64_t c = 0; c < C; ++c) {
          check_index(idx[c], plane_in);
          g[idx[c] * C + c] += dy[c];
        }
      }
      if (bn.x) bn.rows(g, n * plane_in * C, plane_in, C);
    }
  });
}

// The kernels for the shared entry points (entry_points.h).
struct CpuMaxPool {
  using Guard = NoDeviceGuard;
  static void forward(MaxPool2dPlan& p) {
    TORCH_CHECK(p.h.in * p.w.in <= std::numeric_limits<int32_t>::max(), "batchops.max_pool2d: input planes of ",
                p.h.in, "x", p.w.in, " values are larger than the CPU kernel's 2^31 - 1");
    cpu_kernel_for(p.input.scalar_type(), BATCHOPS_CPU_KERNELS(max_pool2d_forward))(p);
  }
  static void backward(MaxPool2dPlan& p) {
    // Channels-last gathers where it can (cpu_kernels.h), else scatters.
    if (p.channels_last &&
        cpu_kernel_for(p.grad_output.scalar_type(), BATCHOPS_CPU_KERNELS(max_pool2d_backward_channels_last))(p)) {
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.grad_output.scalar_type(),
                                    "batchops_max_pool2d_backward_cpu", [&] {
                                      p.channels_last ? backward_channels_last<scalar_t>(p)
                                                      : backward_planar<scalar_t>(p);
                                    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_max_pool_ops<CpuMaxPool>(m); }

}  // namespace batchops
