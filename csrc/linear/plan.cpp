// Argument checks, shapes and group offsets for the linear ops, shared by the CPU and CUDA
// implementations. Error types follow torch's for the same mistakes: F.linear raises
// RuntimeError for shape, dtype and device mismatches, torch.split_with_sizes RuntimeError for
// bad split sizes, and NotImplementedError for an unsupported dtype.
#include "linear/linear.h"
#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

namespace batchops {
namespace {

void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  check_same_device(op, name, t, input);
  check_same_dtype(op, name, t, input);
}

std::vector<int64_t> offsets_from_sizes(const char* op, const at::Tensor& sizes_cpu, int64_t rows) {
  const auto sizes = sizes_cpu.to(at::kLong).contiguous();
  const int64_t* s = sizes.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(sizes.numel() + 1, 0);
  for (int64_t g = 0; g < sizes.numel(); ++g) {
    TORCH_CHECK(s[g] >= 0, op, ": group_sizes must be non-negative, got ", s[g], " for group ", g);
    offsets[g + 1] = offsets[g] + s[g];
  }
  TORCH_CHECK(offsets.back() == rows, op, ": group_sizes sum to ", offsets.back(), " but input has ", rows,
              " rows (expected group_sizes to sum exactly to the number of rows)");
  return offsets;
}

// The product of all but the last dimension: the number of rows of t seen as (rows, last).
int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// t as (rows, width), contiguous. The row count is explicit: reshape({-1, width}) cannot infer
// it when the tensor is empty (width 0, i.e. in_features or out_features 0).
at::Tensor rows_view(const at::Tensor& t, int64_t rows, int64_t width) {
  return t.reshape({rows, width}).contiguous();
}

}  // namespace

LinearPlan plan_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       std::optional<c10::string_view> activation) {
  LinearPlan p;
  p.op = "batchops.linear";
  p.mode = LinearMode::kDense;
  p.act = parse_activation(activation, p.op);
  check_floating_input(p.op, input);
  TORCH_CHECK(input.dim() >= 1, p.op, ": input must have at least 1 dimension, got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2, p.op, ": weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  check_like_input(p.op, "weight", weight, input);
  p.K = weight.size(1);
  p.N = weight.size(0);
  TORCH_CHECK(input.size(-1) == p.K, p.op, ": input's last dimension is ", input.size(-1),
              " but weight has in_features = ", p.K, " (shapes ", input.sizes(), " and ", weight.sizes(),
              " cannot be multiplied)");
  if (bias.has_value() && bias->defined()) {
    check_like_input(p.op, "bias", *bias, input);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.N, p.op, ": bias must have shape (", p.N,
                ",) (one per output feature), got ", bias->sizes());
    p.bias = bias->contiguous();
  }
  p.rows = leading_rows(input);
  p.x = rows_view(input, p.rows, p.K);
  p.weight = weight.contiguous();
  p.G = 1;
  p.offsets = {0, p.rows};
  p.in_sizes = input.sizes().vec();
  p.out_sizes = input.sizes().vec();
  p.out_sizes.back() = p.N;
  return p;
}

LinearPlan plan_grouped_linear(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_sizes,
                               std::optional<c10::string_view> activation,
                               const std::optional<at::Tensor>& group_offsets) {
  LinearPlan p;
  p.op = "batchops.grouped_linear";
  p.act = parse_activation(activation, p.op);
  check_floating_input(p.op, input);
  TORCH_CHECK(weight.dim() == 3, p.op, ": weight must be 3-D (num_groups, out_features, in_features), got shape ",
              weight.sizes());
  check_like_input(p.op, "weight", weight, input);
  p.G = weight.size(0);
  p.N = weight.size(1);
  p.K = weight.size(2);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == p.K, p.op, ": input's last dimension is ",
              input.dim() >= 1 ? input.size(-1) : 0, " but weight has in_features = ", p.K, " (input shape ",
              input.sizes(), ", weight shape ", weight.sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    check_like_input(p.op, "bias", *bias, input);
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == p.G && bias->size(1) == p.N, p.op,
                ": bias must have shape (num_groups, out_features) = (", p.G, ", ", p.N, "), got ", bias->sizes());
    p.bias = bias->contiguous();
  }
  p.weight = weight.contiguous();
  p.in_sizes = input.sizes().vec();
  p.out_sizes = input.sizes().vec();
  p.out_sizes.back() = p.N;
  if (group_offsets.has_value() && group_offsets->defined()) {
    // Forward's group_offsets output, handed to backward. Its values are forward's, made from
    // checked sizes: like torch's backward ops with what their forward saved, they are not
    // checked again (that would take a sync or device-side asserts per backward on CUDA).
    const at::Tensor& o = *group_offsets;
    TORCH_CHECK(o.scalar_type() == at::kLong && o.dim() == 1 && o.size(0) == p.G + 1 && o.device() == input.device(),
                p.op, ": group_offsets must be the forward op's group_offsets output, an int64 tensor of shape (",
                p.G + 1, ",) on ", input.device(), "; got ", o.scalar_type(), " of shape ", o.sizes(), " on ",
                o.device());
    p.group_offsets = o;
  }

  if (group_sizes.has_value() && group_sizes->defined()) {
    p.mode = LinearMode::kRagged;
    const at::Tensor& sizes = *group_sizes;
    TORCH_CHECK(input.dim() == 2, p.op, ": with group_sizes, input must be 2-D (total_rows, in_features) with rows "
                "ordered by group, got shape ", input.sizes());
    TORCH_CHECK_TYPE(!at::isFloatingType(sizes.scalar_type()) && !at::isComplexType(sizes.scalar_type()) &&
                         sizes.scalar_type() != at::kBool,
                     p.op, ": group_sizes must be an integer tensor, got dtype ", sizes.scalar_type());
    TORCH_CHECK(sizes.dim() == 1 && sizes.size(0) == p.G, p.op, ": group_sizes must have one entry per group (",
                p.G, "), got shape ", sizes.sizes());
    TORCH_CHECK(sizes.device().is_cpu() || sizes.device() == input.device(), p.op, ": group_sizes is on ",
                sizes.device(), " but input is on ", input.device(), " (expected the CPU or the input's device)");
    p.x = input.contiguous();
    p.rows = p.x.size(0);
    if (sizes.device().is_cpu()) {
      p.offsets = offsets_from_sizes(p.op, sizes, p.rows);
      if (!input.is_cpu() && !p.group_offsets.defined()) {
        // The offsets, staged in pinned memory and uploaded without blocking: a plain .to()
        // from pageable memory synchronises the host with the GPU.
        at::Tensor staged = at::empty({p.G + 1}, sizes.options().dtype(at::kLong).pinned_memory(true));
        std::copy(p.offsets.begin(), p.offsets.end(), staged.mutable_data_ptr<int64_t>());
        p.group_offsets = staged.to(input.device(), at::kLong, /*non_blocking=*/true);
      }
    } else {
      // Sizes on the GPU: checked there without a host sync (plan_group_offsets).
      p.group_sizes = sizes.to(at::kLong).contiguous();
    }
  } else {
    p.mode = LinearMode::kUniform;
    TORCH_CHECK(input.dim() >= 2 && input.size(0) == p.G, p.op,
                ": without group_sizes, input must be (num_groups, ..., in_features) with num_groups = ", p.G,
                ", got shape ", input.sizes(), "; pass group_sizes for rows (total_rows, in_features) in ragged groups");
    p.rows = leading_rows(input);
    p.x = rows_view(input, p.rows, p.K);
    const int64_t per_group = p.G > 0 ? p.rows / p.G : 0;
    p.offsets.resize(p.G + 1);
    for (int64_t g = 0; g <= p.G; ++g) p.offsets[g] = g * per_group;
  }
  return p;
}

LinearBackwardPlan plan_linear_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& group_sizes, const at::Tensor& output,
                                        const at::Tensor& saved, std::optional<c10::string_view> activation,
                                        std::array<bool, 3> output_mask, bool grouped,
                                        const std::optional<at::Tensor>& group_offsets) {
  LinearBackwardPlan b;
  b.fwd = grouped ? plan_grouped_linear(input, weight, bias, group_sizes, activation, group_offsets)
                  : plan_linear(input, weight, bias, activation);
  const LinearPlan& p = b.fwd;
  const char* op = grouped ? "batchops.grouped_linear_backward" : "batchops.linear_backward";
  check_like_input(op, "grad_output", grad_output, input);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(p.out_sizes), op, ": grad_output has shape ",
              grad_output.sizes(), ", expected the output's shape ", at::IntArrayRef(p.out_sizes));
  b.grad_output = rows_view(grad_output, p.rows, p.N);
  if (p.act == Activation::kReLU) {
    TORCH_CHECK(output.sizes() == at::IntArrayRef(p.out_sizes), op, ": output has shape ", output.sizes(),
                ", expected ", at::IntArrayRef(p.out_sizes));
    b.saved = rows_view(output, p.rows, p.N);
  } else if (activation_saves_derivative(p.act)) {
    TORCH_CHECK(saved.numel() == p.rows * p.N && saved.scalar_type() == input.scalar_type(), op,
                ": saved (the activation's derivative) has shape ", saved.sizes(), " and dtype ", saved.scalar_type(),
                ", expected ", p.rows * p.N, " elements of ", input.scalar_type(),
                " (pass the second output of the forward op)");
    b.saved = rows_view(saved, p.rows, p.N);
  }
  b.mask = output_mask;
  if (!p.bias.defined()) b.mask[2] = false;
  return b;
}

const at::Tensor& plan_group_offsets(LinearPlan& p) {
  if (p.group_offsets.defined()) return p.group_offsets;
  const auto long_opts = p.x.options().dtype(at::kLong);
  if (!p.offsets.empty() && p.x.is_cpu()) {
    p.group_offsets = at::empty({static_cast<int64_t>(p.offsets.size())}, long_opts);
    std::copy(p.offsets.begin(), p.offsets.end(), p.group_offsets.mutable_data_ptr<int64_t>());
  } else if (p.mode == LinearMode::kRagged) {
    TORCH_INTERNAL_ASSERT(p.group_sizes.defined(), "ragged sizes on the host are uploaded as offsets by the plan");
    at::_assert_async(p.group_sizes.ge(0).all(), "batchops.grouped_linear: group_sizes must be non-negative");
    at::_assert_async(p.group_sizes.sum().eq(p.rows),
                      "batchops.grouped_linear: group_sizes must sum exactly to the number of input rows");
    p.group_offsets = at::cat({at::zeros({1}, long_opts), p.group_sizes.cumsum(0)});
  } else {
    p.group_offsets = at::arange(p.G + 1, long_opts).mul_(p.G > 0 ? p.rows / p.G : 0);
  }
  return p.group_offsets;
}

at::Tensor linear_undefined_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace batchops
