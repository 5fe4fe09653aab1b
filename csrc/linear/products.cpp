// The matrix products of dense and uniform-group linear layers, for both devices: ATen's BLAS
// (MKL on the CPU, cuBLAS on CUDA) does them; our kernels only add the epilogues. Ragged groups
// have their own products (cpu.cpp: per row block; cuda.cu: the grouped GEMM).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>

#include "linear/linear.h"

namespace batchops {

void linear_product_out(const LinearPlan& p, at::Tensor z, bool with_bias) {
  TORCH_INTERNAL_ASSERT(p.mode != LinearMode::kRagged);
  if (p.rows == 0) return;
  if (p.mode == LinearMode::kDense) {
    if (with_bias) {
      at::addmm_out(z, p.bias, p.x, p.weight.t());
    } else {
      at::mm_out(z, p.x, p.weight.t());
    }
    return;
  }
  const int64_t B = p.rows / p.G;
  auto z3 = z.view({p.G, B, p.N});
  const auto x3 = p.x.view({p.G, B, p.K});
  if (with_bias) {
    at::baddbmm_out(z3, p.bias.view({p.G, 1, p.N}), x3, p.weight.transpose(1, 2));
  } else {
    at::bmm_out(z3, x3, p.weight.transpose(1, 2));
  }
}

void linear_backward_products_out(const LinearPlan& p, const at::Tensor& dz, at::Tensor grad_input,
                                  at::Tensor grad_weight) {
  TORCH_INTERNAL_ASSERT(p.mode != LinearMode::kRagged);
  if (p.mode == LinearMode::kDense) {
    if (grad_input.defined()) at::mm_out(grad_input, dz, p.weight);
    if (grad_weight.defined()) at::mm_out(grad_weight, dz.t(), p.x);
    return;
  }
  const int64_t B = p.G > 0 ? p.rows / p.G : 0;
  const auto dz3 = dz.view({p.G, B, p.N});
  if (grad_input.defined()) {
    auto gi = grad_input.view({p.G, B, p.K});
    at::bmm_out(gi, dz3, p.weight);
  }
  if (grad_weight.defined()) at::bmm_out(grad_weight, dz3.transpose(1, 2), p.x.view({p.G, B, p.K}));
}

}  // namespace batchops
