// Argument checks every op's plan makes, with torch's error types for the same mistakes: a
// tensor on another device or of another dtype than the input is a RuntimeError (as in
// F.linear, F.batch_norm), an input dtype no kernel computes in a NotImplementedError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace batchops {

// The dtypes the batch-norm and linear kernels compute in.
inline void check_floating_input(const char* op, const at::Tensor& input) {
  const auto t = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
                              ": input must be float32, float64, float16 or bfloat16, got ", t);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device(), " (expected all tensors to be on the same device)");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type(), " (expected the same dtype)");
}

}  // namespace batchops
