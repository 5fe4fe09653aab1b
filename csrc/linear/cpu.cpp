// Linear layers on the CPU: ATen's BLAS-backed matmul (MKL / oneDNN in torch's builds) for
// the products, our epilogues (cpu_kernels.h) for bias, activation, the activation's
// derivative and the bias gradient, and our scheduling of ragged groups.
//
// Dense and uniform groups: one multi-threaded product (mm / bmm), then the epilogue over
// row blocks in parallel. Ragged groups: the row blocks of all groups are dealt to the threads
// in contiguous runs of about equal work, and each thread multiplies a block (single-threaded
// BLAS: nested OpenMP regions run serially) and applies the epilogue while the block is still
// in cache. That replaces G Python-level calls (each a multi-threaded product too small to
// split well, plus a separate activation pass) with one call.
//
// The row blocks depend only on the shapes, and the bias gradient is summed block by block
// in a fixed order, so results do not depend on the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#include "linear/entry_points.h"
#include "linear/linear.h"

#define BATCHOPS_CPU_NS cpu_default
#include "linear/cpu_kernels.h"
#undef BATCHOPS_CPU_NS

namespace batchops {

#if BATCHOPS_CPU_VARIANTS
namespace cpu_avx2 {
void linear_epilogue_forward(at::ScalarType, Activation, void*, void*, const void*, int64_t, int64_t);
void linear_epilogue_backward(at::ScalarType, Activation, const void*, const void*, void*, void*, int64_t, int64_t);
}  // namespace cpu_avx2
namespace cpu_avx512 {
void linear_epilogue_forward(at::ScalarType, Activation, void*, void*, const void*, int64_t, int64_t);
void linear_epilogue_backward(at::ScalarType, Activation, const void*, const void*, void*, void*, int64_t, int64_t);
}  // namespace cpu_avx512
#endif

namespace {

void epilogue_forward(at::ScalarType dtype, Activation act, void* z, void* derivative, const void* bias, int64_t rows,
                      int64_t N) {
  cpu_kernel_for(dtype, BATCHOPS_CPU_KERNELS(linear_epilogue_forward))(dtype, act, z, derivative, bias, rows, N);
}

void epilogue_backward(at::ScalarType dtype, Activation act, const void* dy, const void* saved, void* dz,
                       void* bias_sum, int64_t rows, int64_t N) {
  cpu_kernel_for(dtype, BATCHOPS_CPU_KERNELS(linear_epilogue_backward))(dtype, act, dy, saved, dz, bias_sum, rows, N);
}

// Rows per block: 128 rows of 256 float outputs is 128 KiB, which stays in L2 between the
// product and the epilogue. Fixed (not derived from the thread count): see the top of the file.
constexpr int64_t kBlockRows = 128;

struct RowBlock {
  int64_t group, begin, end;
};

std::vector<RowBlock> row_blocks(const std::vector<int64_t>& offsets) {
  std::vector<RowBlock> blocks;
  for (size_t g = 0; g + 1 < offsets.size(); ++g) {
    for (int64_t r = offsets[g]; r < offsets[g + 1]; r += kBlockRows) {
      blocks.push_back({int64_t(g), r, std::min(r + kBlockRows, offsets[g + 1])});
    }
  }
  return blocks;
}

// Runs fn(i) for i in [0, cost.size()), dealing contiguous runs of about equal total cost to
// the threads. Worker threads do not inherit the caller's dispatch state, so ATen calls made
// in fn would go through autograd again; the guard keeps them below it, as on the caller.
template <typename F>
void parallel_balanced(const std::vector<double>& cost, const F& fn) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n);
  std::vector<int64_t> start(parts + 1, n);
  start[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    const double target = prefix[n] * double(t) / double(parts);
    start[t] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    start[t] = std::clamp<int64_t>(start[t], start[t - 1], n);
  }
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t t = pb; t < pe; ++t) {
      for (int64_t i = start[t]; i < start[t + 1]; ++i) fn(i);
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Bias in the accumulation type, one row per group; zeros when there is no bias, so the
// kernels have one code path.
at::Tensor bias_rows(const LinearPlan& p) {
  const auto acc = acc_type(p.x.scalar_type());
  if (p.bias.defined()) return p.bias.to(acc).reshape({p.G, p.N}).contiguous();
  return at::zeros({1, p.N}, p.x.options().dtype(acc));
}

const char* bias_row(const at::Tensor& bias_acc, int64_t group) {
  const int64_t row = bias_acc.size(0) == 1 ? 0 : group;
  return static_cast<const char*>(bias_acc.const_data_ptr()) + row * bias_acc.size(1) * bias_acc.element_size();
}

char* row_ptr(const at::Tensor& t, int64_t row) {
  return static_cast<char*>(t.data_ptr()) + row * t.size(1) * t.element_size();
}

// The product of one ragged group's rows [begin, end) into out's rows, plus bias_g (the
// group's bias row, in the BLAS call) when it is defined.
void ragged_product(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w_g, int64_t begin, int64_t end,
                    const at::Tensor& bias_g = at::Tensor()) {
  auto o = out.narrow(0, begin, end - begin);
  if (bias_g.defined()) {
    at::addmm_out(o, bias_g, x.narrow(0, begin, end - begin), w_g);
  } else {
    at::mm_out(o, x.narrow(0, begin, end - begin), w_g);
  }
}


std::tuple<at::Tensor, at::Tensor> forward_cpu(LinearPlan& p) {
  const auto opts = p.x.options();
  const bool save_derivative = plan_saves_derivative(p);
  if (p.mode == LinearMode::kDense && p.act == Activation::kNone) {
    // torch's own F.linear (addmm with the bias in the BLAS call): the same numbers as torch.
    return {linear_shaped(at::linear(p.x, p.weight, p.bias.defined() ? std::optional<at::Tensor>(p.bias) : std::nullopt),
                   p.out_sizes),
            at::empty({0}, opts)};
  }
  // Where the bias is added. None (grouped): in the BLAS call, the product is the result, as
  // F.linear. relu, hardswish and relu6 in half precision: in the BLAS call too, so x W^T + b is rounded
  // once (rounding x W^T to half first and then adding the bias flips relu's mask, and its
  // gradient, wherever x W^T + b is within a rounding of 0; hardswish's derivative jumps at -3
  // and 3, relu6's at 0 and 6). Otherwise in the epilogue: one add in registers instead of a pass that broadcasts the
  // bias into z, and in float / double as exact as the BLAS call's own beta * C add. The epilogue
  // turns z into the output in place and writes silu / gelu* / hardswish / relu6's derivative (saved, see
  // linear.h) to its own buffer.
  const bool reduced_precision = acc_type(p.x.scalar_type()) != p.x.scalar_type();
  const bool bias_in_product =
      p.bias.defined() && (p.act == Activation::kNone || (activation_derivative_jumps(p.act) && reduced_precision));
  at::Tensor z = at::empty({p.rows, p.N}, opts);
  at::Tensor derivative = save_derivative ? at::empty({p.rows, p.N}, opts) : at::Tensor();
  advise_huge_pages(z);
  advise_huge_pages(derivative);
  const at::Tensor bias_acc = bias_in_product ? at::zeros({1, p.N}, opts.dtype(acc_type(p.x.scalar_type())))
                                              : bias_rows(p);
  const bool need_epilogue = p.act != Activation::kNone;  // None: the product (with its bias) is the result
  const auto blocks = row_blocks(p.offsets);
  const auto dtype = p.x.scalar_type();
  auto epilogue = [&](const RowBlock& b) {
    if (!need_epilogue) return;
    epilogue_forward(dtype, p.act, row_ptr(z, b.begin), save_derivative ? row_ptr(derivative, b.begin) : nullptr,
                     bias_row(bias_acc, b.group), b.end - b.begin, p.N);
  };
  std::vector<double> cost(blocks.size());
  if (p.mode == LinearMode::kRagged) {
    // Product and epilogue per block; a fixed per-call overhead worth ~8 rows.
    for (size_t i = 0; i < blocks.size(); ++i) cost[i] = double(blocks[i].end - blocks[i].begin + 8);
    parallel_balanced(cost, [&](int64_t i) {
      const RowBlock& b = blocks[i];
      if (p.K == 0) {
        auto zb = z.narrow(0, b.begin, b.end - b.begin);
        if (bias_in_product) {
          zb.copy_(p.bias[b.group].expand_as(zb));
        } else {
          zb.zero_();
        }
      } else {
        ragged_product(z, p.x, p.weight[b.group].t(), b.begin, b.end,
                       bias_in_product ? p.bias[b.group] : at::Tensor());
      }
      epilogue(b);
    });
  } else {
    linear_product_out(p, z, bias_in_product);
    if (need_epilogue) {
      for (size_t i = 0; i < blocks.size(); ++i) cost[i] = double(blocks[i].end - blocks[i].begin);
      parallel_balanced(cost, [&](int64_t i) { epilogue(blocks[i]); });
    }
  }
  return {linear_shaped(z, p.out_sizes), save_derivative ? linear_shaped(derivative, p.out_sizes) : at::empty({0}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(LinearBackwardPlan& b) {
  LinearPlan& p = b.fwd;
  const auto opts = p.x.options();
  const auto dtype = p.x.scalar_type();
  const bool need_dz = p.act != Activation::kNone;  // else the gradient passes straight through
  const bool any_product = b.mask[0] || b.mask[1];
  const at::Tensor& dy = b.grad_output;
  at::Tensor dz = need_dz && any_product ? at::empty({p.rows, p.N}, opts) : dy;
  const auto blocks = row_blocks(p.offsets);
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  at::Tensor partial;  // per-block column sums of dz, for the bias gradient
  if (b.mask[2]) partial = at::zeros({nblocks, p.N}, opts.dtype(acc_type(dtype)));
  const bool run_epilogue = (need_dz && any_product) || b.mask[2];
  const void* saved_base = b.saved.defined() ? b.saved.const_data_ptr() : dy.const_data_ptr();
  const int64_t elt = dy.element_size();

  at::Tensor grad_input = b.mask[0] ? at::empty({p.rows, p.K}, opts) : at::Tensor();
  at::Tensor grad_weight = b.mask[1] ? at::empty(p.weight.sizes(), opts) : at::Tensor();
  if (b.mask[0]) advise_huge_pages(grad_input);
  if (dz.data_ptr() != dy.data_ptr()) advise_huge_pages(dz);

  auto epilogue = [&](int64_t i) {
    const RowBlock& blk = blocks[i];
    const int64_t off = blk.begin * p.N * elt;
    epilogue_backward(dtype, p.act, static_cast<const char*>(dy.const_data_ptr()) + off,
                      static_cast<const char*>(saved_base) + off,
                      need_dz && any_product ? static_cast<char*>(dz.data_ptr()) + off : nullptr,
                      b.mask[2] ? row_ptr(partial, i) : nullptr, blk.end - blk.begin, p.N);
  };
  std::vector<double> cost(blocks.size());
  if (p.mode == LinearMode::kRagged) {
    // dz block, then that block's rows of grad_input while dz is in cache.
    for (size_t i = 0; i < blocks.size(); ++i) cost[i] = double(blocks[i].end - blocks[i].begin + 8);
    parallel_balanced(cost, [&](int64_t i) {
      if (run_epilogue) epilogue(i);
      if (b.mask[0]) {
        const RowBlock& blk = blocks[i];
        if (p.N == 0) {
          grad_input.narrow(0, blk.begin, blk.end - blk.begin).zero_();
        } else {
          ragged_product(grad_input, dz, p.weight[blk.group], blk.begin, blk.end);
        }
      }
    });
    if (b.mask[1]) {
      // grad_weight[g] = dz_g^T x_g, split along out_features when there are fewer groups than
      // threads, so one large group still uses every thread.
      const int64_t threads = at::get_num_threads();
      const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(p.N, (2 * threads + p.G - 1) / std::max<int64_t>(p.G, 1)));
      const int64_t chunk = std::max<int64_t>(1, (p.N + splits - 1) / splits);
      struct WeightTask { int64_t group, n0, n1; };
      std::vector<WeightTask> tasks;
      std::vector<double> wcost;
      for (int64_t g = 0; g < p.G; ++g) {
        for (int64_t n0 = 0; n0 < p.N; n0 += chunk) {
          tasks.push_back({g, n0, std::min(p.N, n0 + chunk)});
          wcost.push_back(double(p.offsets[g + 1] - p.offsets[g] + 8) * double(std::min(p.N, n0 + chunk) - n0));
        }
      }
      parallel_balanced(wcost, [&](int64_t i) {
        const WeightTask& t = tasks[i];
        const int64_t r0 = p.offsets[t.group], r1 = p.offsets[t.group + 1];
        auto out = grad_weight[t.group].narrow(0, t.n0, t.n1 - t.n0);
        if (r1 == r0) {
          out.zero_();  // an empty group gets a zero gradient
        } else {
          at::mm_out(out, dz.narrow(0, r0, r1 - r0).narrow(1, t.n0, t.n1 - t.n0).t(), p.x.narrow(0, r0, r1 - r0));
        }
      });
    }
  } else {
    if (run_epilogue) {
      for (size_t i = 0; i < blocks.size(); ++i) cost[i] = double(blocks[i].end - blocks[i].begin);
      parallel_balanced(cost, epilogue);
    }
    linear_backward_products_out(p, dz, b.mask[0] ? grad_input : at::Tensor(),
                                 b.mask[1] ? grad_weight : at::Tensor());
  }

  at::Tensor grad_bias;
  if (b.mask[2]) {
    // Block sums merged in block order (blocks are ordered by group): the same result for any
    // thread count. Groups without rows get zeros.
    at::Tensor sums = at::zeros({p.G, p.N}, partial.options());
    AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "batchops.linear_backward", [&] {
      const scalar_t* src = partial.const_data_ptr<scalar_t>();
      scalar_t* dst = sums.data_ptr<scalar_t>();
      for (int64_t i = 0; i < nblocks; ++i) {
        scalar_t* row = dst + blocks[i].group * p.N;
        const scalar_t* part = src + i * p.N;
        for (int64_t j = 0; j < p.N; ++j) row[j] += part[j];
      }
    });
    grad_bias = linear_shaped(sums.to(p.bias.scalar_type()), p.bias.sizes());
  }
  return {b.mask[0] ? linear_shaped(grad_input, p.in_sizes) : linear_undefined_grad(p.x),
          b.mask[1] ? grad_weight : linear_undefined_grad(p.x), b.mask[2] ? grad_bias : linear_undefined_grad(p.x)};
}

// The kernels for the shared entry points (entry_points.h).
struct CpuLinear {
  using Guard = NoDeviceGuard;
  static std::tuple<at::Tensor, at::Tensor> forward(LinearPlan& p) { return forward_cpu(p); }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(LinearBackwardPlan& b) { return backward_cpu(b); }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_linear_ops<CpuLinear>(m); }

}  // namespace batchops
