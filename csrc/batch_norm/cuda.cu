// Batch norm on CUDA.
//
// Training forward is three launches, as torch's: partial per-channel statistics over
// fixed chunks (Welford per thread, Chan merge across threads), a per-channel finalize that
// merges the chunks in a fixed order and updates the running statistics, and an elementwise
// apply. Backward mirrors it (partial sums, finalize, apply). Partials are merged in a
// fixed order with no float atomics, so results are bitwise reproducible, and nothing
// synchronises with the host (CUDA-graph capturable; momentum may be a device tensor).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "batch_norm/batch_norm.h"
#include "batch_norm/entry_points.h"
#include "common/cuda_launch.h"

namespace batchops {
namespace {

// The schedule (block shapes, chunk counts, merge order) is in batch_norm.h, where the CPU
// replays it (cuda_replay.cpp).
constexpr int kPlanarThreads = kCudaPlanarThreads;
constexpr int kRowsX = kCudaRowsX;
constexpr int kRowsY = kCudaRowsY;

// ---------------------------------------------------------------------------------------
// Reducers: what a partial-reduction kernel accumulates per channel.

template <typename scalar_t, typename acc_t>
struct WelfordReducer {
  using State = WelfordData<acc_t>;
  const scalar_t* x;
  __device__ State init() const { return State(); }
  __device__ void update(State& s, int64_t i, int64_t /*c*/) const { welford_update(s, static_cast<acc_t>(x[i])); }
  __device__ static State merge(const State& a, const State& b) { return welford_merge(a, b); }
};

template <typename acc_t>
struct GradSums {
  acc_t g = acc_t(0);
  acc_t gxmu = acc_t(0);
};

// Recomputes the pre-activation from x (and z) to get g = dy * act'(pre).
template <typename scalar_t, typename acc_t, Activation A, bool kResidual>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;  // may be null (= 1)
  const acc_t* bias;    // may be null (= 0)
  const scalar_t* z;

  __device__ acc_t scale(int64_t c) const { return invstd[c] * (weight ? weight[c] : acc_t(1)); }
  __device__ acc_t shift(int64_t c) const { return bias ? bias[c] : acc_t(0); }
  __device__ acc_t pre_activation(acc_t x, int64_t i, int64_t c) const {
    acc_t v = (x - mean[c]) * scale(c) + shift(c);
    if constexpr (kResidual) v += static_cast<acc_t>(z[i]);
    return v;
  }
  __device__ acc_t upstream_grad(acc_t dy, acc_t x, int64_t i, int64_t c) const {
    if constexpr (A == Activation::kNone) {
      return dy;
    } else {
      return dy * activation_backward<A>(pre_activation(x, i, c));
    }
  }
};

template <typename scalar_t, typename acc_t, Activation A, bool kResidual>
struct GradReducer {
  using State = GradSums<acc_t>;
  const scalar_t* x;
  const scalar_t* dy;
  ChannelParams<scalar_t, acc_t, A, kResidual> params;
  __device__ State init() const { return State(); }
  __device__ void update(State& s, int64_t i, int64_t c) const {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t g = params.upstream_grad(static_cast<acc_t>(dy[i]), xv, i, c);
    s.g += g;
    s.gxmu += g * (xv - params.mean[c]);
  }
  __device__ static State merge(const State& a, const State& b) {
    State o;
    o.g = a.g + b.g;
    o.gxmu = a.gxmu + b.gxmu;
    return o;
  }
};

// ---------------------------------------------------------------------------------------
// Partial reductions. Tree reductions in shared memory run in a fixed order.

// Planar (N, C, inner): grid (C, chunks), channels on x (up to 2^31 - 1 of them; y and z
// stop at 65535); block (c, k) reduces chunk k of channel c's N*inner values.
// partial[c * chunks + k].
template <typename Reducer>
__global__ void partial_reduce_planar(Reducer r, int64_t N, int64_t C, int64_t inner,
                                      typename Reducer::State* partial) {
  using State = typename Reducer::State;
  __shared__ __align__(16) unsigned char smem[kPlanarThreads * sizeof(State)];
  State* shared = reinterpret_cast<State*>(smem);
  const int64_t c = blockIdx.x;
  const int64_t M = N * inner;
  const int64_t chunk = (M + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < M ? begin + chunk : M;
  State s = r.init();
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t n = index_div(j, inner);
    const int64_t i = n * C * inner + c * inner + (j - n * inner);
    r.update(s, i, c);
  }
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] = Reducer::merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[c * gridDim.y + blockIdx.y] = shared[0];
}

// Rows (M, C): grid (ceil(C / kRowsX), chunks); thread x picks the channel, y strides the
// chunk's rows. partial[chunk * C + c].
template <typename Reducer>
__global__ void partial_reduce_rows(Reducer r, int64_t M, int64_t C, typename Reducer::State* partial) {
  using State = typename Reducer::State;
  __shared__ __align__(16) unsigned char smem[kRowsX * kRowsY * sizeof(State)];
  State* shared = reinterpret_cast<State*>(smem);
  const int64_t c = int64_t(blockIdx.x) * kRowsX + threadIdx.x;
  const int64_t chunk = (M + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < M ? begin + chunk : M;
  State s = r.init();
  if (c < C) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kRowsY) r.update(s, row * C + c, c);
  }
  shared[threadIdx.y * kRowsX + threadIdx.x] = s;
  __syncthreads();
  for (int stride = kRowsY / 2; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride) {
      shared[threadIdx.y * kRowsX + threadIdx.x] =
          Reducer::merge(shared[threadIdx.y * kRowsX + threadIdx.x], shared[(threadIdx.y + stride) * kRowsX + threadIdx.x]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) partial[blockIdx.y * C + c] = shared[threadIdx.x];
}

PartialGrid partial_grid(const BatchNormLayout& l) {
  return cuda_partial_grid(l, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

template <typename Reducer>
at::Tensor launch_partial_reduce(const Reducer& r, const BatchNormLayout& l, const PartialGrid& g,
                                 const at::Tensor& like) {
  using State = typename Reducer::State;
  at::Tensor buffer = at::empty({std::max<int64_t>(1, g.chunks * l.C) * int64_t(sizeof(State))},
                                like.options().dtype(at::kByte));
  if (g.chunks == 0) return buffer;
  auto stream = at::cuda::getCurrentCUDAStream();
  State* partial = reinterpret_cast<State*>(buffer.data_ptr());
  if (l.rows) {
    dim3 grid((l.C + kRowsX - 1) / kRowsX, g.chunks);
    partial_reduce_rows<<<grid, dim3(kRowsX, kRowsY), 0, stream>>>(r, l.per_channel(), l.C, partial);
  } else {
    TORCH_CHECK(l.C < (int64_t(1) << 31), "batchops.batch_norm: at most 2^31 - 1 channels on CUDA, got ", l.C);
    dim3 grid(static_cast<unsigned>(l.C), static_cast<unsigned>(g.chunks));
    partial_reduce_planar<<<grid, kPlanarThreads, 0, stream>>>(r, l.N, l.C, l.inner, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buffer;
}

// ---------------------------------------------------------------------------------------
// Per-channel finalize kernels (one thread per channel; partials merged in order).

template <typename acc_t>
__global__ void finalize_stats(const WelfordData<acc_t>* partial, PartialGrid g, double eps, double momentum,
                               const acc_t* momentum_tensor, bool update_running, const acc_t* running_mean,
                               const acc_t* running_var, acc_t* save_mean, acc_t* save_invstd,
                               acc_t* new_running_mean, acc_t* new_running_var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const WelfordData<double> s = merge_chunk_partials(partial, g, c);
  const double m = momentum_tensor ? double(*momentum_tensor) : momentum;
  double mean, invstd, new_mean = 0, new_var = 0;  // in double like the CPU's finalize, eps and momentum too
  batch_norm_finalize_channel<double>(s, eps, m, update_running,
                                      update_running ? double(running_mean[c]) : 0.0,
                                      update_running ? double(running_var[c]) : 0.0, &mean, &invstd, &new_mean,
                                      &new_var);
  save_mean[c] = acc_t(mean);
  save_invstd[c] = acc_t(invstd);
  if (update_running) {
    new_running_mean[c] = acc_t(new_mean);
    new_running_var[c] = acc_t(new_var);
  }
}

// batch_norm_stats: the merged statistics as mean and m2 (both 0 for an empty channel).
template <typename acc_t>
__global__ void finalize_mean_m2(const WelfordData<acc_t>* partial, PartialGrid g, acc_t* mean, acc_t* m2) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const WelfordData<double> s = merge_chunk_partials(partial, g, c);
  mean[c] = acc_t(s.mean);
  m2[c] = acc_t(s.m2);
}

template <typename acc_t>
__global__ void eval_stats(int64_t C, acc_t eps, const acc_t* running_mean, const acc_t* running_var,
                           acc_t* save_mean, acc_t* save_invstd) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  save_mean[c] = running_mean[c];
  save_invstd[c] = acc_t(1) / std::sqrt(running_var[c] + eps);
}

template <typename acc_t>
__global__ void finalize_grads(const GradSums<acc_t>* partial, PartialGrid g, int64_t count, bool training,
                               const acc_t* invstd, const acc_t* weight, acc_t* grad_weight, acc_t* grad_bias,
                               acc_t* coeffs, const acc_t* ext_mean_g = nullptr,
                               const acc_t* ext_mean_gxhat = nullptr) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  double sg = 0, sgx = 0;  // chunk sums added in double, as the CPU adds its pieces
  for (int64_t k = 0; k < g.chunks; ++k) {
    sg += double(partial[g.index(c, k)].g);
    sgx += double(partial[g.index(c, k)].gxmu);
  }
  if (grad_weight) grad_weight[c] = acc_t(sgx * double(invstd[c]));
  if (grad_bias) grad_bias[c] = acc_t(sg);
  // The coefficients in double, cast once, as the CPU's finalize (1 / count is inexact in float
  // above 2^24 values, and proj would be rounded four times).
  auto k = batch_norm_backward_coeffs<double>(sg, sgx, count, double(invstd[c]), weight ? double(weight[c]) : 1.0,
                                              training);
  if (ext_mean_g) {  // batch_norm_backward_elemt: coefficients of the whole distributed batch
    k.mean_g = double(ext_mean_g[c]);
    k.proj = double(ext_mean_gxhat[c]) * double(invstd[c]);
  }
  coeffs[3 * c] = acc_t(k.mean_g);
  coeffs[3 * c + 1] = acc_t(k.proj);
  coeffs[3 * c + 2] = acc_t(k.scale);
}

// ---------------------------------------------------------------------------------------
// Elementwise passes.

__host__ __device__ inline int64_t channel_of(int64_t i, bool rows, int64_t C, int64_t inner) {
  return rows ? index_mod(i, C) : index_mod(index_div(i, inner), C);
}

template <typename scalar_t, typename acc_t, Activation A, bool kResidual>
__global__ void forward_apply(const scalar_t* x, scalar_t* y, ChannelParams<scalar_t, acc_t, A, kResidual> p,
                              int64_t numel, bool rows, int64_t C, int64_t inner) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(i, rows, C, inner);
    y[i] = static_cast<scalar_t>(activation_forward<A>(p.pre_activation(static_cast<acc_t>(x[i]), i, c)));
  }
}

// dx and dz are written when not null: a branch the whole grid takes the same way, cheaper
// than compiling this kernel once per (grad_input, grad_residual) pair.
template <typename scalar_t, typename acc_t, Activation A, bool kResidual>
__global__ void backward_apply(const scalar_t* x, const scalar_t* dy, scalar_t* dx, scalar_t* dz,
                               ChannelParams<scalar_t, acc_t, A, kResidual> p, const acc_t* coeffs, int64_t numel,
                               bool rows, int64_t C, int64_t inner) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(i, rows, C, inner);
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t g = p.upstream_grad(static_cast<acc_t>(dy[i]), xv, i, c);
    if (dx != nullptr) {
      dx[i] = static_cast<scalar_t>((g - coeffs[3 * c] - (xv - p.mean[c]) * coeffs[3 * c + 1]) * coeffs[3 * c + 2]);
    }
    if (dz != nullptr) dz[i] = static_cast<scalar_t>(g);
  }
}

// The elementwise passes: up to 32 blocks of 256 threads per SM, grid-stride beyond.
dim3 elementwise_grid(int64_t numel) { return dim3(grid_stride_blocks(numel, 256, 32)); }

void forward_cuda(BatchNormForwardPlan& p) {
  const auto& l = p.layout;
  if (l.C == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned channel_blocks = static_cast<unsigned>((l.C + 255) / 256);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "batchops_batch_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* save_mean = p.save_mean.mutable_data_ptr<acc_t>();
    acc_t* save_invstd = p.save_invstd.mutable_data_ptr<acc_t>();
    if (p.training) {
      const auto g = partial_grid(l);
      WelfordReducer<scalar_t, acc_t> reducer{p.input.const_data_ptr<scalar_t>()};
      at::Tensor partial = launch_partial_reduce(reducer, l, g, p.input);
      finalize_stats<acc_t><<<channel_blocks, 256, 0, stream>>>(
          reinterpret_cast<const WelfordData<acc_t>*>(partial.const_data_ptr()), g, p.eps, p.momentum,
          ptr_or_null<acc_t>(p.momentum_tensor), p.update_running, ptr_or_null<acc_t>(p.running_mean),
          ptr_or_null<acc_t>(p.running_var), save_mean, save_invstd,
          p.update_running ? p.new_running_mean.mutable_data_ptr<acc_t>() : nullptr,
          p.update_running ? p.new_running_var.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      eval_stats<acc_t><<<channel_blocks, 256, 0, stream>>>(l.C, acc_t(p.eps), p.running_mean.const_data_ptr<acc_t>(),
                                                            p.running_var.const_data_ptr<acc_t>(), save_mean,
                                                            save_invstd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t numel = p.output.numel();
    if (numel == 0) return;
    BATCHOPS_DISPATCH_ACTIVATION(p.activation, [&] {
      BATCHOPS_DISPATCH_BOOL(p.residual.defined(), kResidual, [&] {
        ChannelParams<scalar_t, acc_t, kAct, kResidual> params{
            save_mean, save_invstd, ptr_or_null<acc_t>(p.weight), ptr_or_null<acc_t>(p.bias),
            kResidual ? p.residual.const_data_ptr<scalar_t>() : nullptr};
        forward_apply<scalar_t, acc_t, kAct, kResidual><<<elementwise_grid(numel), 256, 0, stream>>>(
            p.input.const_data_ptr<scalar_t>(), p.output.mutable_data_ptr<scalar_t>(), params, numel, l.rows, l.C,
            l.inner);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void backward_cuda(BatchNormBackwardPlan& p) {
  const bool training = p.training;
  const auto& l = p.layout;
  if (l.C == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned channel_blocks = static_cast<unsigned>((l.C + 255) / 256);
  const bool need_sums = p.mask[1] || p.mask[2] || (p.mask[0] && training);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "batchops_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor coeffs = at::empty({3 * l.C}, p.save_mean.options());
    BATCHOPS_DISPATCH_ACTIVATION(p.activation, [&] {
      BATCHOPS_DISPATCH_BOOL(p.residual.defined(), kResidual, [&] {
        ChannelParams<scalar_t, acc_t, kAct, kResidual> params{
            p.save_mean.const_data_ptr<acc_t>(), p.save_invstd.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(p.weight),
            ptr_or_null<acc_t>(p.bias), kResidual ? p.residual.const_data_ptr<scalar_t>() : nullptr};
        // Without sums (eval mode, grad_input only) the finalize still runs over zero
        // partials to produce the per-channel coefficients.
        PartialGrid g = partial_grid(l);
        if (!need_sums) g.chunks = 0;
        GradReducer<scalar_t, acc_t, kAct, kResidual> reducer{p.input.const_data_ptr<scalar_t>(),
                                                             p.grad_output.const_data_ptr<scalar_t>(), params};
        at::Tensor partial = launch_partial_reduce(reducer, l, g, p.input);
        finalize_grads<acc_t><<<channel_blocks, 256, 0, stream>>>(
            reinterpret_cast<const GradSums<acc_t>*>(partial.const_data_ptr()), g, l.per_channel(), training,
            p.save_invstd.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(p.weight),
            p.mask[1] ? p.grad_weight.mutable_data_ptr<acc_t>() : nullptr,
            p.mask[2] ? p.grad_bias.mutable_data_ptr<acc_t>() : nullptr, coeffs.mutable_data_ptr<acc_t>(),
            ptr_or_null<acc_t>(p.mean_g), ptr_or_null<acc_t>(p.mean_gxhat));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t numel = p.input.numel();
        if (numel == 0 || !(p.mask[0] || p.mask[3])) return;
        backward_apply<scalar_t, acc_t, kAct, kResidual><<<elementwise_grid(numel), 256, 0, stream>>>(
            p.input.const_data_ptr<scalar_t>(), p.grad_output.const_data_ptr<scalar_t>(),
            p.mask[0] ? p.grad_input.mutable_data_ptr<scalar_t>() : nullptr,
            p.mask[3] ? p.grad_residual.mutable_data_ptr<scalar_t>() : nullptr, params,
            coeffs.const_data_ptr<acc_t>(), numel, l.rows, l.C, l.inner);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void stats_cuda(BatchNormStatsPlan& p) {
  const auto& l = p.layout;
  if (l.C == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned channel_blocks = static_cast<unsigned>((l.C + 255) / 256);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "batchops_batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = partial_grid(l);  // no chunks for an empty batch: the finalize writes zeros
    WelfordReducer<scalar_t, acc_t> reducer{p.input.const_data_ptr<scalar_t>()};
    at::Tensor partial = launch_partial_reduce(reducer, l, g, p.input);
    finalize_mean_m2<acc_t><<<channel_blocks, 256, 0, stream>>>(
        reinterpret_cast<const WelfordData<acc_t>*>(partial.const_data_ptr()), g, p.mean.mutable_data_ptr<acc_t>(),
        p.m2.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The kernels for the shared entry points (entry_points.h).
struct CudaBatchNorm {
  using Guard = c10::cuda::CUDAGuard;
  static void forward(BatchNormForwardPlan& p) { forward_cuda(p); }
  static void backward(BatchNormBackwardPlan& p) { backward_cuda(p); }
  static void stats(BatchNormStatsPlan& p) { stats_cuda(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CUDA, m) { register_batch_norm_ops<CudaBatchNorm>(m); }

}  // namespace batchops
