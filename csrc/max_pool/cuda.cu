// 2-D max pooling on CUDA: a thread per output value (forward) and a thread per input value
// (backward, which gathers the gradient of the outputs whose windows can hold it: no atomics,
// the same sums on every run). Both layouts index the same way with different strides.
// Compiled in CI, not yet run on a GPU (README).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/cuda_launch.h"
#include "max_pool/entry_points.h"
#include "max_pool/max_pool.h"

namespace batchops {
namespace {

__device__ inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// Where value (n, c, y, x) of a (batch, C, rows, cols) tensor lives, in either layout.
struct Layout {
  int64_t C, rows, cols;
  bool channels_last;
  __device__ int64_t offset(int64_t n, int64_t c, int64_t y, int64_t x) const {
    return channels_last ? ((n * rows + y) * cols + x) * C + c : ((n * C + c) * rows + y) * cols + x;
  }
  // The inverse, for a linear position in memory order.
  __device__ void coords(int64_t i, int64_t& n, int64_t& c, int64_t& y, int64_t& x) const {
    if (channels_last) {
      c = index_mod(i, C), i = index_div(i, C), x = index_mod(i, cols), i = index_div(i, cols);
      y = index_mod(i, rows), n = index_div(i, rows);
    } else {
      x = index_mod(i, cols), i = index_div(i, cols), y = index_mod(i, rows), i = index_div(i, rows);
      c = index_mod(i, C), n = index_div(i, C);
    }
  }
};

template <typename scalar_t>
__global__ void max_pool2d_forward_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                          int64_t* __restrict__ indices, int64_t total, Layout in_layout,
                                          Layout out_layout, PoolAxis h, PoolAxis w) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    out_layout.coords(i, n, c, oh, ow);
    int64_t ih0 = oh * h.stride - h.padding, iw0 = ow * w.stride - w.padding;
    const int64_t ih1 = smaller(ih0 + (h.kernel - 1) * h.dilation + 1, h.in);
    const int64_t iw1 = smaller(iw0 + (w.kernel - 1) * w.dilation + 1, w.in);
    while (ih0 < 0) ih0 += h.dilation;
    while (iw0 < 0) iw0 += w.dilation;
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int64_t best_position = ih0 * w.in + iw0;
    for (int64_t ih = ih0; ih < ih1; ih += h.dilation) {
      for (int64_t iw = iw0; iw < iw1; iw += w.dilation) {
        const acc_t v = static_cast<acc_t>(in[in_layout.offset(n, c, ih, iw)]);
        if (v > best || v != v) {  // NaN wins, as in torch
          best = v;
          best_position = ih * w.in + iw;
        }
      }
    }
    out[i] = static_cast<scalar_t>(best);
    indices[i] = best_position;
  }
}

template <typename scalar_t>
__global__ void max_pool2d_backward_kernel(const scalar_t* __restrict__ grad_output,
                                           const int64_t* __restrict__ indices, scalar_t* __restrict__ grad_input,
                                           int64_t total, Layout in_layout, Layout out_layout, PoolAxis h,
                                           PoolAxis w) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, ih, iw;
    in_layout.coords(i, n, c, ih, iw);
    // The outputs whose windows can reach (ih, iw); the index says which really took it.
    const int64_t span_h = (h.kernel - 1) * h.dilation + 1, span_w = (w.kernel - 1) * w.dilation + 1;
    const int64_t oh0 = ih + h.padding < span_h ? 0 : index_div(ih + h.padding - span_h, h.stride) + 1;
    const int64_t ow0 = iw + w.padding < span_w ? 0 : index_div(iw + w.padding - span_w, w.stride) + 1;
    const int64_t oh1 = smaller(index_div(ih + h.padding, h.stride) + 1, h.out);
    const int64_t ow1 = smaller(index_div(iw + w.padding, w.stride) + 1, w.out);
    const int64_t position = ih * w.in + iw;
    acc_t sum = 0;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const int64_t o = out_layout.offset(n, c, oh, ow);
        if (indices[o] == position) sum += static_cast<acc_t>(grad_output[o]);
      }
    }
    grad_input[i] = static_cast<scalar_t>(sum);
  }
}

Layout input_layout(const MaxPool2dPlan& p) { return {p.channels, p.h.in, p.w.in, p.channels_last}; }
Layout output_layout(const MaxPool2dPlan& p) { return {p.channels, p.h.out, p.w.out, p.channels_last}; }

// The kernels for the shared entry points (entry_points.h).
struct CudaMaxPool {
  using Guard = c10::cuda::CUDAGuard;
  static void forward(MaxPool2dPlan& p) {
    const int64_t total = p.output.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "batchops_max_pool2d_cuda", [&] {
      max_pool2d_forward_kernel<scalar_t><<<grid_stride_blocks(total, 256, 16), 256, 0,
                                            at::cuda::getCurrentCUDAStream()>>>(
          p.input.const_data_ptr<scalar_t>(), p.output.mutable_data_ptr<scalar_t>(),
          p.indices.mutable_data_ptr<int64_t>(), total, input_layout(p), output_layout(p), p.h, p.w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  static void backward(MaxPool2dPlan& p) {
    const int64_t total = p.grad_input.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, p.grad_output.scalar_type(), "batchops_max_pool2d_backward_cuda", [&] {
          max_pool2d_backward_kernel<scalar_t><<<grid_stride_blocks(total, 256, 16), 256, 0,
                                                 at::cuda::getCurrentCUDAStream()>>>(
              p.grad_output.const_data_ptr<scalar_t>(), p.indices.const_data_ptr<int64_t>(),
              p.grad_input.mutable_data_ptr<scalar_t>(), total, input_layout(p), output_layout(p), p.h, p.w);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    // max_pool2d_batch_norm_backward: the batch-norm pass as a second pass (ATen's kernels) here.
    if (p.bn_coefficients.defined()) apply_batch_norm_coefficients(p);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CUDA, m) { register_max_pool_ops<CudaMaxPool>(m); }

}  // namespace batchops
