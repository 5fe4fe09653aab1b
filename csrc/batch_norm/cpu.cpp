// Batch norm on the CPU.
//
// Work is cut into fixed pieces (kPiece elements of one channel run, or a block of rows in
// the channels-last view) whose partial results are merged in a fixed order, so results do
// not depend on the thread count. Each piece is small enough to stay in L1/L2, which makes
// the two-pass (shifted) statistics inside a piece free of extra DRAM traffic: forward reads
// x twice and writes y once, backward reads (dy, x) twice and writes dx once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "batch_norm/batch_norm.h"

namespace batchops {
namespace {

constexpr int64_t kPiece = 4096;

// Planar view (N, C, inner): each (n, c) run split into pieces of at most kPiece elements.
// Piece t = (c * N + n) * per_run + p, so one channel's pieces are consecutive.
struct PlanarPieces {
  int64_t N, C, inner, per_run;
  explicit PlanarPieces(const BatchNormLayout& l)
      : N(l.N), C(l.C), inner(l.inner), per_run(std::max<int64_t>(1, (l.inner + kPiece - 1) / kPiece)) {}
  int64_t count() const { return C * N * per_run; }
  int64_t per_channel() const { return N * per_run; }
  void locate(int64_t t, int64_t& c, int64_t& offset, int64_t& len) const {
    const int64_t p = t % per_run;
    const int64_t cn = t / per_run;
    const int64_t n = cn % N;
    c = cn / N;
    const int64_t start = p * kPiece;
    len = std::min(kPiece, inner - start);
    offset = (n * C + c) * inner + start;
  }
};

// Rows view (M, C): blocks of rows of about kPiece elements.
struct RowBlocks {
  int64_t M, C, rows_per_block, count_;
  explicit RowBlocks(const BatchNormLayout& l)
      : M(l.N * l.inner), C(l.C), rows_per_block(std::max<int64_t>(1, kPiece / std::max<int64_t>(l.C, 1))) {
    count_ = (M + rows_per_block - 1) / rows_per_block;
  }
  int64_t count() const { return count_; }
  int64_t begin(int64_t b) const { return b * rows_per_block; }
  int64_t end(int64_t b) const { return std::min(M, (b + 1) * rows_per_block); }
};

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Shifted two-pass statistics of one L1-resident run: mean = shift + sum(d)/n and
// m2 = sum(d^2) - sum(d)^2/n with d = x - shift, accurate for large means (x = 1e4 + noise).
template <typename scalar_t>
WelfordData<double> run_stats(const scalar_t* x, int64_t n) {
  using acc = opmath_t<scalar_t>;
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc>(x[i]);
  const acc shift = s / acc(n);
  acc sd = 0, sdd = 0;
#pragma omp simd reduction(+ : sd, sdd)
  for (int64_t i = 0; i < n; ++i) {
    const acc d = static_cast<acc>(x[i]) - shift;
    sd += d;
    sdd += d * d;
  }
  WelfordData<double> w;
  w.count = n;
  w.mean = double(shift) + double(sd) / double(n);
  w.m2 = std::max(0.0, double(sdd) - double(sd) * double(sd) / double(n));
  return w;
}

// The same per channel for a block of rows; out[c] receives channel c's statistics.
template <typename scalar_t>
void rows_stats(const scalar_t* x, int64_t rows, int64_t C, std::vector<opmath_t<scalar_t>>& scratch,
                WelfordData<double>* out) {
  using acc = opmath_t<scalar_t>;
  scratch.assign(3 * C, acc(0));
  acc* s = scratch.data();
  acc* sd = s + C;
  acc* sdd = sd + C;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) s[c] += static_cast<acc>(xr[c]);
  }
  for (int64_t c = 0; c < C; ++c) s[c] /= acc(rows);  // s now holds the shift
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc d = static_cast<acc>(xr[c]) - s[c];
      sd[c] += d;
      sdd[c] += d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    out[c].count = rows;
    out[c].mean = double(s[c]) + double(sd[c]) / double(rows);
    out[c].m2 = std::max(0.0, double(sdd[c]) - double(sd[c]) * double(sd[c]) / double(rows));
  }
}

// Per-channel statistics merged in a fixed order: planar pieces of a channel are
// consecutive; row blocks are merged block by block.
template <typename scalar_t>
std::vector<WelfordData<double>> channel_stats(const at::Tensor& input, const BatchNormLayout& l) {
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t C = l.C;
  std::vector<WelfordData<double>> stats(C);
  if (!l.rows) {
    PlanarPieces pieces(l);
    std::vector<WelfordData<double>> partial(pieces.count());
    at::parallel_for(0, pieces.count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t c, off, len;
        pieces.locate(t, c, off, len);
        partial[t] = run_stats(x + off, len);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        WelfordData<double> w;
        for (int64_t k = 0; k < pieces.per_channel(); ++k) w = welford_merge(w, partial[c * pieces.per_channel() + k]);
        stats[c] = w;
      }
    });
  } else {
    RowBlocks blocks(l);
    std::vector<WelfordData<double>> partial(blocks.count() * C);
    at::parallel_for(0, blocks.count(), 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t<scalar_t>> scratch;
      for (int64_t b = begin; b < end; ++b) {
        rows_stats(x + blocks.begin(b) * C, blocks.end(b) - blocks.begin(b), C, scratch, partial.data() + b * C);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        WelfordData<double> w;
        for (int64_t b = 0; b < blocks.count(); ++b) w = welford_merge(w, partial[b * C + c]);
        stats[c] = w;
      }
    });
  }
  return stats;
}

// Per-channel affine factors in the kernel's math type: y = act((x - mean) * scale + shift [+ z]).
template <typename acc>
struct ChannelAffine {
  std::vector<acc> mean, scale, shift;
};

template <typename acc, typename stat_t>
ChannelAffine<acc> channel_affine(int64_t C, const stat_t* mean, const stat_t* invstd, const at::Tensor& weight,
                                  const at::Tensor& bias) {
  ChannelAffine<acc> a;
  a.mean.resize(C);
  a.scale.resize(C);
  a.shift.resize(C);
  const stat_t* w = weight.defined() ? weight.const_data_ptr<stat_t>() : nullptr;
  const stat_t* b = bias.defined() ? bias.const_data_ptr<stat_t>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    a.mean[c] = acc(mean[c]);
    a.scale[c] = acc(invstd[c] * (w ? w[c] : stat_t(1)));
    a.shift[c] = acc(b ? b[c] : stat_t(0));
  }
  return a;
}

template <typename scalar_t, Activation A, bool kResidual>
void forward_apply(const BatchNormForwardPlan& p, const ChannelAffine<opmath_t<scalar_t>>& a) {
  using acc = opmath_t<scalar_t>;
  const auto& l = p.layout;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* z = kResidual ? p.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y = p.output.mutable_data_ptr<scalar_t>();
  if (!l.rows) {
    PlanarPieces pieces(l);
    at::parallel_for(0, pieces.count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t c, off, len;
        pieces.locate(t, c, off, len);
        const acc mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
#pragma omp simd
        for (int64_t i = off; i < off + len; ++i) {
          acc v = (static_cast<acc>(x[i]) - mean) * scale + shift;
          if constexpr (kResidual) v += static_cast<acc>(z[i]);
          y[i] = static_cast<scalar_t>(activation_forward<A>(v));
        }
      }
    });
  } else {
    const int64_t C = l.C;
    const acc* mean = a.mean.data();
    const acc* scale = a.scale.data();
    const acc* shift = a.shift.data();
    at::parallel_for(0, l.N * l.inner, std::max<int64_t>(1, kPiece / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const int64_t base = r * C;
#pragma omp simd
                         for (int64_t c = 0; c < C; ++c) {
                           acc v = (static_cast<acc>(x[base + c]) - mean[c]) * scale[c] + shift[c];
                           if constexpr (kResidual) v += static_cast<acc>(z[base + c]);
                           y[base + c] = static_cast<scalar_t>(activation_forward<A>(v));
                         }
                       }
                     });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum,
    const std::optional<at::Tensor>& momentum_tensor, double eps, std::optional<c10::string_view> activation) {
  auto p = plan_batch_norm_forward(input, weight, bias, residual, running_mean, running_var, training, momentum,
                                   momentum_tensor, eps, activation);
  const auto& l = p.layout;
  const int64_t C = l.C;
  if (p.momentum_tensor.defined()) p.momentum = p.momentum_tensor.item<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batchops_batch_norm_forward_cpu", [&] {
    using acc = opmath_t<scalar_t>;
    using stat_t = acc;  // float for half/bfloat16/float inputs, double for double
    stat_t* save_mean = p.save_mean.mutable_data_ptr<stat_t>();
    stat_t* save_invstd = p.save_invstd.mutable_data_ptr<stat_t>();
    if (training) {
      const auto stats = channel_stats<scalar_t>(p.input, l);
      for (int64_t c = 0; c < C; ++c) {
        double m, is, nrm = 0, nrv = 0;
        const double rm = p.update_running ? double(p.running_mean.const_data_ptr<stat_t>()[c]) : 0.0;
        const double rv = p.update_running ? double(p.running_var.const_data_ptr<stat_t>()[c]) : 0.0;
        batch_norm_finalize_channel<double>(stats[c], p.eps, p.momentum, p.update_running, rm, rv, &m, &is, &nrm,
                                            &nrv);
        save_mean[c] = stat_t(m);
        save_invstd[c] = stat_t(is);
        if (p.update_running) {
          p.new_running_mean.mutable_data_ptr<stat_t>()[c] = stat_t(nrm);
          p.new_running_var.mutable_data_ptr<stat_t>()[c] = stat_t(nrv);
        }
      }
    } else {
      const stat_t* rm = p.running_mean.const_data_ptr<stat_t>();
      const stat_t* rv = p.running_var.const_data_ptr<stat_t>();
      for (int64_t c = 0; c < C; ++c) {
        save_mean[c] = rm[c];
        save_invstd[c] = stat_t(1) / std::sqrt(rv[c] + stat_t(p.eps));
      }
    }
    if (p.output.numel() == 0) return;
    const auto affine = channel_affine<acc, stat_t>(C, save_mean, save_invstd, p.weight, p.bias);
    BATCHOPS_DISPATCH_ACTIVATION(p.activation, [&] {
      BATCHOPS_DISPATCH_BOOL(p.residual.defined(), kResidual,
                             [&] { forward_apply<scalar_t, kAct, kResidual>(p, affine); });
    });
  });
  return finish_batch_norm_forward(p);
}

// ---------------------------------------------------------------------------------------
// Backward

// g = dy * act'(pre), pre recomputed from x (and z): no full-size tensor is saved for it.
template <typename acc, Activation A, bool kResidual, typename scalar_t>
inline acc upstream_grad(scalar_t dy, scalar_t x, const scalar_t* z, int64_t i, acc mean, acc scale, acc shift) {
  if constexpr (A == Activation::kNone) {
    return static_cast<acc>(dy);
  } else {
    acc pre = (static_cast<acc>(x) - mean) * scale + shift;
    if constexpr (kResidual) pre += static_cast<acc>(z[i]);
    return static_cast<acc>(dy) * activation_backward<A>(pre);
  }
}

template <typename scalar_t, Activation A, bool kResidual>
void backward_reduce(const BatchNormBackwardPlan& p, const ChannelAffine<opmath_t<scalar_t>>& a,
                     std::vector<double>& sum_g, std::vector<double>& sum_gxmu) {
  using acc = opmath_t<scalar_t>;
  const auto& l = p.layout;
  const int64_t C = l.C;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_output.const_data_ptr<scalar_t>();
  const scalar_t* z = kResidual ? p.residual.const_data_ptr<scalar_t>() : nullptr;
  sum_g.assign(C, 0.0);
  sum_gxmu.assign(C, 0.0);
  if (!l.rows) {
    PlanarPieces pieces(l);
    std::vector<double> partial(2 * pieces.count());
    at::parallel_for(0, pieces.count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t c, off, len;
        pieces.locate(t, c, off, len);
        const acc mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
        acc sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t i = off; i < off + len; ++i) {
          const acc g = upstream_grad<acc, A, kResidual>(dy[i], x[i], z, i, mean, scale, shift);
          sg += g;
          sgx += g * (static_cast<acc>(x[i]) - mean);
        }
        partial[2 * t] = sg;
        partial[2 * t + 1] = sgx;
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < pieces.per_channel(); ++k) {
        const int64_t t = c * pieces.per_channel() + k;
        sum_g[c] += partial[2 * t];
        sum_gxmu[c] += partial[2 * t + 1];
      }
    }
  } else {
    RowBlocks blocks(l);
    std::vector<double> partial(2 * blocks.count() * C);
    const acc* mean = a.mean.data();
    const acc* scale = a.scale.data();
    const acc* shift = a.shift.data();
    at::parallel_for(0, blocks.count(), 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> scratch(2 * C);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(scratch.begin(), scratch.end(), acc(0));
        acc* sg = scratch.data();
        acc* sgx = sg + C;
        for (int64_t r = blocks.begin(b); r < blocks.end(b); ++r) {
          const int64_t base = r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc g = upstream_grad<acc, A, kResidual>(dy[base + c], x[base + c], z, base + c, mean[c],
                                                           scale[c], shift[c]);
            sg[c] += g;
            sgx[c] += g * (static_cast<acc>(x[base + c]) - mean[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          partial[2 * (b * C + c)] = sg[c];
          partial[2 * (b * C + c) + 1] = sgx[c];
        }
      }
    });
    for (int64_t b = 0; b < blocks.count(); ++b) {
      for (int64_t c = 0; c < C; ++c) {
        sum_g[c] += partial[2 * (b * C + c)];
        sum_gxmu[c] += partial[2 * (b * C + c) + 1];
      }
    }
  }
}

template <typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
void backward_apply(const BatchNormBackwardPlan& p, const ChannelAffine<opmath_t<scalar_t>>& a,
                    const std::vector<BackwardCoeffs<opmath_t<scalar_t>>>& k) {
  using acc = opmath_t<scalar_t>;
  const auto& l = p.layout;
  const int64_t C = l.C;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_output.const_data_ptr<scalar_t>();
  const scalar_t* z = kResidual ? p.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = kGradInput ? p.grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dz = kGradResidual ? p.grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  // Channel constants are passed by value so the compiler can keep them in registers
  // (through references it must assume dx may alias them and reloads every element).
  auto element = [=](int64_t i, acc mean, acc scale, acc shift, BackwardCoeffs<acc> kc) {
    const acc g = upstream_grad<acc, A, kResidual>(dy[i], x[i], z, i, mean, scale, shift);
    if constexpr (kGradInput) {
      dx[i] = static_cast<scalar_t>((g - kc.mean_g - (static_cast<acc>(x[i]) - mean) * kc.proj) * kc.scale);
    }
    if constexpr (kGradResidual) dz[i] = static_cast<scalar_t>(g);
  };
  if (!l.rows) {
    PlanarPieces pieces(l);
    at::parallel_for(0, pieces.count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t c, off, len;
        pieces.locate(t, c, off, len);
        const acc mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
        const BackwardCoeffs<acc> kc = k[c];
#pragma omp simd
        for (int64_t i = off; i < off + len; ++i) element(i, mean, scale, shift, kc);
      }
    });
  } else {
    const acc* mean = a.mean.data();
    const acc* scale = a.scale.data();
    const acc* shift = a.shift.data();
    const BackwardCoeffs<acc>* kc = k.data();
    at::parallel_for(0, l.N * l.inner, std::max<int64_t>(1, kPiece / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
#pragma omp simd
                         for (int64_t c = 0; c < C; ++c) element(r * C + c, mean[c], scale[c], shift[c], kc[c]);
                       }
                     });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, std::optional<c10::string_view> activation,
    std::array<bool, 4> output_mask) {
  auto p = plan_batch_norm_backward(grad_output, input, weight, bias, residual, save_mean, save_invstd, training,
                                    activation, output_mask);
  const auto& l = p.layout;
  const int64_t C = l.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batchops_batch_norm_backward_cpu", [&] {
    using acc = opmath_t<scalar_t>;
    using stat_t = acc;
    const stat_t* mean = p.save_mean.const_data_ptr<stat_t>();
    const stat_t* invstd = p.save_invstd.const_data_ptr<stat_t>();
    const auto affine = channel_affine<acc, stat_t>(C, mean, invstd, p.weight, p.bias);
    const bool need_sums = p.mask[1] || p.mask[2] || (p.mask[0] && training);
    std::vector<double> sum_g(C, 0.0), sum_gxmu(C, 0.0);
    BATCHOPS_DISPATCH_ACTIVATION(p.activation, [&] {
      BATCHOPS_DISPATCH_BOOL(p.residual.defined(), kResidual, [&] {
        if (need_sums && p.input.numel() > 0) backward_reduce<scalar_t, kAct, kResidual>(p, affine, sum_g, sum_gxmu);
        std::vector<BackwardCoeffs<acc>> k(C);
        const stat_t* w = p.weight.defined() ? p.weight.const_data_ptr<stat_t>() : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          const auto kc = batch_norm_backward_coeffs<double>(sum_g[c], sum_gxmu[c], l.per_channel(), double(invstd[c]),
                                                             w ? double(w[c]) : 1.0, training);
          k[c] = {acc(kc.mean_g), acc(kc.proj), acc(kc.scale)};
          if (p.mask[1]) p.grad_weight.mutable_data_ptr<stat_t>()[c] = stat_t(sum_gxmu[c] * double(invstd[c]));
          if (p.mask[2]) p.grad_bias.mutable_data_ptr<stat_t>()[c] = stat_t(sum_g[c]);
        }
        if (p.input.numel() == 0) return;
        BATCHOPS_DISPATCH_BOOL(p.mask[0], kGradInput, [&] {
          BATCHOPS_DISPATCH_BOOL(p.mask[3], kGradResidual, [&] {
            if constexpr (kGradInput || kGradResidual) {
              backward_apply<scalar_t, kAct, kResidual, kGradInput, kGradResidual>(p, affine, k);
            }
          });
        });
      });
    });
  });
  return finish_batch_norm_backward(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace batchops
