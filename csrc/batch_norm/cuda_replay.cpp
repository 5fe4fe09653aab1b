// The CUDA batch-norm statistics schedule replayed on the CPU, for tests: the chunk counts of
// a GPU with a given number of SMs, Welford per simulated thread, the blocks' shared-memory
// merge trees in their order, and the finalize's merge (batch_norm.h), all through the same
// host+device functions the kernels in cuda.cu call. No GPU is needed to check the accuracy
// of what the GPU computes (float arithmetic and merge order; nvcc's FMA contraction aside).
//
// torch.ops.batchops_testing.batch_norm_stats_cuda_schedule(input, sm_count) -> (mean, m2),
// like batch_norm_stats. A namespace of its own: it is no batchops op (no CUDA kernel, no
// autograd, not public API).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "batch_norm/batch_norm.h"

namespace batchops {
namespace {

template <typename scalar_t>
void replay_stats(BatchNormStatsPlan& p, int sms) {
  using acc_t = at::opmath_type<scalar_t>;
  using State = WelfordData<acc_t>;
  const BatchNormLayout& l = p.layout;
  const PartialGrid g = cuda_partial_grid(l, sms);
  const int64_t M = l.per_channel();
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  std::vector<State> partial(std::max<int64_t>(1, g.chunks * l.C));
  const int64_t chunk = g.chunks > 0 ? (M + g.chunks - 1) / g.chunks : 0;
  for (int64_t k = 0; k < g.chunks; ++k) {
    const int64_t begin = k * chunk;
    const int64_t end = std::min(begin + chunk, M);
    for (int64_t c = 0; c < l.C; ++c) {
      if (!l.rows) {  // partial_reduce_planar: block (c, k), kCudaPlanarThreads threads
        std::array<State, kCudaPlanarThreads> shared{};
        for (int t = 0; t < kCudaPlanarThreads; ++t) {
          for (int64_t j = begin + t; j < end; j += kCudaPlanarThreads) {
            const int64_t n = j / l.inner;
            welford_update(shared[t], static_cast<acc_t>(x[n * l.C * l.inner + c * l.inner + (j - n * l.inner)]));
          }
        }
        for (int stride = kCudaPlanarThreads / 2; stride > 0; stride >>= 1) {
          for (int t = 0; t < stride; ++t) shared[t] = welford_merge(shared[t], shared[t + stride]);
        }
        partial[g.index(c, k)] = shared[0];
      } else {  // partial_reduce_rows: channel c's column of block (c / kCudaRowsX, k)
        std::array<State, kCudaRowsY> lanes{};
        for (int y = 0; y < kCudaRowsY; ++y) {
          for (int64_t row = begin + y; row < end; row += kCudaRowsY) {
            welford_update(lanes[y], static_cast<acc_t>(x[row * l.C + c]));
          }
        }
        for (int stride = kCudaRowsY / 2; stride > 0; stride >>= 1) {
          for (int y = 0; y < stride; ++y) lanes[y] = welford_merge(lanes[y], lanes[y + stride]);
        }
        partial[g.index(c, k)] = lanes[0];
      }
    }
  }
  acc_t* mean = p.mean.mutable_data_ptr<acc_t>();
  acc_t* m2 = p.m2.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < l.C; ++c) {  // finalize_mean_m2
    const WelfordData<double> s = merge_chunk_partials(partial.data(), g, c);
    mean[c] = acc_t(s.mean);
    m2[c] = acc_t(s.m2);
  }
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda_schedule(const at::Tensor& input, int64_t sm_count) {
  TORCH_CHECK_VALUE(sm_count > 0, "batch_norm_stats_cuda_schedule: sm_count must be positive, got ", sm_count);
  auto p = plan_batch_norm_stats(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "batch_norm_stats_cuda_schedule",
                                  [&] { replay_stats<scalar_t>(p, static_cast<int>(sm_count)); });
  return {p.mean, p.m2};
}

}  // namespace

TORCH_LIBRARY(batchops_testing, m) {
  m.def("batch_norm_stats_cuda_schedule(Tensor input, int sm_count) -> (Tensor mean, Tensor m2)");
}

TORCH_LIBRARY_IMPL(batchops_testing, CPU, m) {
  m.impl("batch_norm_stats_cuda_schedule", &batch_norm_stats_cuda_schedule);
}

}  // namespace batchops
