// Batch norm: the plan both devices share (argument checks, layout, allocation) and the
// per-channel arithmetic written once for host and device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>

#include "common/activation.h"
#include "common/welford.h"

namespace batchops {

// ---------------------------------------------------------------------------------------
// The ops (common/op.h): name, schema and C++ signature, said once. schema.cpp defines them,
// entry_points.h implements them for both devices, autograd.cpp adds the Autograd kernels and
// batchops/ops/batch_norm.py the fake ones.

// Functional: the new running statistics are returned (empty when not updated) and copied
// into the buffers by the Python layer, so the op can carry autograd. y = act(bn(x) + residual);
// save_mean / save_invstd are float (double for double input).
struct BatchNormForwardOp {
  static constexpr const char* name = "batch_norm_forward";
  static constexpr const char* schema =
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor? running_mean, Tensor? running_var, bool training, float momentum, "
      "Tensor? momentum_tensor, float eps, str? activation) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor new_running_mean, Tensor new_running_var)";
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var, bool training, double momentum,
      const std::optional<at::Tensor>& momentum_tensor, double eps, std::optional<c10::string_view> activation);
};

// output_mask: grad_input, grad_weight, grad_bias, grad_residual; unrequested ones are empty.
struct BatchNormBackwardOp {
  static constexpr const char* name = "batch_norm_backward";
  static constexpr const char* schema =
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor save_mean, Tensor save_invstd, bool training, str? activation, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)";
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& save_mean,
      const at::Tensor& save_invstd, bool training, std::optional<c10::string_view> activation,
      std::array<bool, 4> output_mask);
  static constexpr const char* double_backward_error =
      "batchops.batch_norm: double backward (a gradient of the gradient) is not supported. "
      "Use torch.nn.functional.batch_norm where second derivatives are needed.";
};

// For SyncBatchNorm. Per-channel mean and m2 (sum of squared deviations from the mean) of the
// input, float (double for double input); both 0 for an empty batch. The count is
// input.numel() / C. No autograd of its own: SyncBatchNorm's autograd.Function calls it.
struct BatchNormStatsOp {
  static constexpr const char* name = "batch_norm_stats";
  static constexpr const char* schema = "batch_norm_stats(Tensor input) -> (Tensor mean, Tensor m2)";
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& input);
};

// For SyncBatchNorm: grad_input = w * invstd * (g - mean_g - xhat * mean_gxhat) with
// g = dy * act'(pre), xhat = (x - save_mean) * save_invstd, and mean_g / mean_gxhat given (per
// channel, over the whole distributed batch); grad_residual = g. output_mask: grad_input,
// grad_residual.
struct BatchNormBackwardElemtOp {
  static constexpr const char* name = "batch_norm_backward_elemt";
  static constexpr const char* schema =
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor save_mean, Tensor save_invstd, Tensor mean_g, Tensor mean_gxhat, str? activation, "
      "bool[2] output_mask) -> (Tensor grad_input, Tensor grad_residual)";
  using Sig = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& save_mean,
      const at::Tensor& save_invstd, const at::Tensor& mean_g, const at::Tensor& mean_gxhat,
      std::optional<c10::string_view> activation, std::array<bool, 2> output_mask);
};

// ---------------------------------------------------------------------------------------
// Per-channel arithmetic (host + device)

// From merged statistics to what forward saves: mean and 1/sqrt(biased var + eps), and the
// running-statistics update, which uses the unbiased variance as torch does.
template <typename acc_t>
C10_HOST_DEVICE inline void batch_norm_finalize_channel(const WelfordData<acc_t>& stats, acc_t eps, acc_t momentum,
                                                        bool update_running, acc_t running_mean, acc_t running_var,
                                                        acc_t* save_mean, acc_t* save_invstd, acc_t* new_running_mean,
                                                        acc_t* new_running_var) {
  const acc_t var = stats.count > 0 ? stats.m2 / acc_t(stats.count) : acc_t(0);
  *save_mean = stats.mean;
  *save_invstd = acc_t(1) / std::sqrt(var + eps);
  if (update_running) {
    if (stats.count == 0) {  // an empty batch leaves the running estimates alone, as torch does
      *new_running_mean = running_mean;
      *new_running_var = running_var;
    } else {
      const acc_t unbiased = stats.count > 1 ? stats.m2 / acc_t(stats.count - 1) : var;
      *new_running_mean = momentum * stats.mean + (acc_t(1) - momentum) * running_mean;
      *new_running_var = momentum * unbiased + (acc_t(1) - momentum) * running_var;
    }
  }
}

// Backward per channel: with g = dy * act'(pre) and xmu = x - mean,
//   grad_bias = sum(g), grad_weight = invstd * sum(g * xmu),
//   grad_input = w * invstd * (g - mean(g) - xmu * invstd^2 * mean(g * xmu))   (training)
//   grad_input = w * invstd * g                                               (eval)
// written as grad_input = (g - mean_g - xmu * proj) * scale.
template <typename acc_t>
struct BackwardCoeffs {
  acc_t mean_g;
  acc_t proj;
  acc_t scale;
};

template <typename acc_t>
C10_HOST_DEVICE inline BackwardCoeffs<acc_t> batch_norm_backward_coeffs(acc_t sum_g, acc_t sum_gxmu, int64_t count,
                                                                        acc_t invstd, acc_t weight, bool training) {
  BackwardCoeffs<acc_t> k;
  k.scale = weight * invstd;
  if (training && count > 0) {  // (batch_norm_backward_elemt sets mean_g / proj itself)
    const acc_t inv_n = acc_t(1) / acc_t(count);
    k.mean_g = sum_g * inv_n;
    k.proj = sum_gxmu * inv_n * invstd * invstd;
  } else {
    k.mean_g = acc_t(0);
    k.proj = acc_t(0);
  }
  return k;
}

// ---------------------------------------------------------------------------------------
// Host-side plan shared by the CPU and CUDA implementations

// The input is handled in one of two native views, never converted between them:
//   planar: (N, C, inner) contiguous, a channel's values are N runs of `inner` elements;
//   rows:   (M, C) with channels innermost: channels-last(-3d) input, or any input with
//           inner == 1 such as (N, C).
struct BatchNormLayout {
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  bool rows = false;
  int64_t N = 0, C = 0, inner = 1;
  int64_t per_channel() const { return N * inner; }
};

struct BatchNormForwardPlan {
  Activation activation = Activation::kNone;
  BatchNormLayout layout;
  bool training = false;
  bool update_running = false;
  double eps = 0, momentum = 0;
  at::Tensor input, residual;        // in layout.format; residual may be undefined
  at::Tensor weight, bias;           // statistic dtype, contiguous; may be undefined
  at::Tensor running_mean, running_var;  // statistic dtype copies; undefined unless given
  at::Tensor momentum_tensor;        // statistic dtype, on the input's device; may be undefined
  // outputs
  at::Tensor output, save_mean, save_invstd, new_running_mean, new_running_var;
  at::ScalarType running_dtype = at::kFloat;
};

// The plans (plan.cpp) take the ops' arguments as the descriptors above say them: the entry
// points pass them straight through, which is why these declarations repeat those lists.
BatchNormForwardPlan plan_batch_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& residual,
                                             const std::optional<at::Tensor>& running_mean,
                                             const std::optional<at::Tensor>& running_var, bool training,
                                             double momentum, const std::optional<at::Tensor>& momentum_tensor,
                                             double eps, std::optional<c10::string_view> activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_batch_norm_forward(
    BatchNormForwardPlan& plan);

struct BatchNormBackwardPlan {
  Activation activation = Activation::kNone;
  BatchNormLayout layout;
  bool training = false;
  std::array<bool, 4> mask{};  // grad_input, grad_weight, grad_bias, grad_residual
  at::Tensor grad_output, input, residual;  // in layout.format
  at::Tensor weight, bias;                  // statistic dtype, contiguous; may be undefined
  at::Tensor save_mean, save_invstd;        // statistic dtype, contiguous
  at::ScalarType weight_dtype = at::kFloat, bias_dtype = at::kFloat;
  // Set by batch_norm_backward_elemt (eval-mode plan): per-channel mean(g) and mean(g * xhat)
  // over the whole (distributed) batch, statistic dtype, contiguous. grad_input then uses
  // the training formula with these instead of local sums. Undefined otherwise.
  at::Tensor mean_g, mean_gxhat;
  // outputs: grad_weight / grad_bias in statistic dtype until finish casts them
  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;
};

BatchNormBackwardPlan plan_batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& residual,
                                               const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                               bool training, std::optional<c10::string_view> activation,
                                               std::array<bool, 4> output_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_batch_norm_backward(BatchNormBackwardPlan& plan);

// Per-channel statistics only (batch_norm_stats, for SyncBatchNorm): mean and m2 = sum of
// squared deviations, both zero for a channel with no values.
struct BatchNormStatsPlan {
  BatchNormLayout layout;
  at::Tensor input;     // in layout.format
  at::Tensor mean, m2;  // outputs, statistic dtype
};

BatchNormStatsPlan plan_batch_norm_stats(const at::Tensor& input);

// batch_norm_backward_elemt: an eval-mode backward plan for grad_input / grad_residual with the
// given global coefficients (see BatchNormBackwardPlan::mean_g).
BatchNormBackwardPlan plan_batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                                     const at::Tensor& mean_g, const at::Tensor& mean_gxhat,
                                                     std::optional<c10::string_view> activation,
                                                     std::array<bool, 2> output_mask);

// The dtype statistics are accumulated and saved in: float for half/bfloat16/float, else double.
inline at::ScalarType batch_norm_stat_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------
// The CUDA statistics schedule (cuda.cu), declared here so the CPU can replay it
// (cuda_replay.cpp, tests): each channel's values are cut into `chunks` contiguous chunks; a
// block reduces a chunk with Welford per thread and a shared-memory tree of Chan merges, and
// the finalize merges the chunks of a channel in order, in double.

constexpr int kCudaPlanarThreads = 256;  // planar view: threads per block, each strides the chunk
constexpr int kCudaRowsX = 32;           // rows view: channels per block (coalesced along C)
constexpr int kCudaRowsY = 8;            // rows view: rows per block step

// How a layout's partial reduction is launched, and where channel c's k-th partial lives.
struct PartialGrid {
  bool rows;
  int64_t chunks;
  int64_t C;
  C10_HOST_DEVICE int64_t index(int64_t c, int64_t k) const { return rows ? k * C + c : c * chunks + k; }
};

// About 4 blocks per SM in all, at least ~4 values per thread, at most 65535 chunks (gridDim.y).
// The chunk count follows the SM count: results are bitwise reproducible per GPU model.
inline PartialGrid cuda_partial_grid(const BatchNormLayout& l, int sms) {
  const int64_t target_blocks = 4 * int64_t(sms);
  const int64_t M = l.per_channel();
  PartialGrid g{l.rows, 1, l.C};
  if (M == 0 || l.C == 0) {
    g.chunks = 0;
  } else if (l.rows) {
    const int64_t col_blocks = (l.C + kCudaRowsX - 1) / kCudaRowsX;
    g.chunks = std::max<int64_t>(1, std::min<int64_t>((M + 4 * kCudaRowsY - 1) / (4 * kCudaRowsY),
                                                      std::max<int64_t>(1, target_blocks / col_blocks)));
  } else {
    g.chunks = std::max<int64_t>(1, std::min<int64_t>((M + 4 * kCudaPlanarThreads - 1) / (4 * kCudaPlanarThreads),
                                                      std::max<int64_t>(1, target_blocks / l.C)));
  }
  g.chunks = std::min<int64_t>(g.chunks, 65535);
  return g;
}

// Channel c's chunk partials merged in chunk order, in double: the finalize chains up to
// thousands of Chan merges, and rounding the mean to float at each one cost up to 5.7e-3
// absolute error at x = 1e4 + N(0, 1) against test_mean_offset's 1e-3.
template <typename acc_t>
C10_HOST_DEVICE inline WelfordData<double> merge_chunk_partials(const WelfordData<acc_t>* partial, const PartialGrid& g,
                                                                int64_t c) {
  WelfordData<double> s;
  for (int64_t k = 0; k < g.chunks; ++k) {
    const WelfordData<acc_t>& p = partial[g.index(c, k)];
    WelfordData<double> d;
    d.mean = static_cast<double>(p.mean);
    d.m2 = static_cast<double>(p.m2);
    d.count = p.count;
    s = welford_merge(s, d);
  }
  return s;
}

}  // namespace batchops
