// Argument checks, layout choice and output allocation for batch norm, shared by the CPU
// and CUDA implementations so both reject the same inputs with the same messages.
#include "batch_norm/batch_norm.h"
#include "common/checks.h"
#include "common/layout.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace batchops {
namespace {

constexpr const char* kForward = "batchops.batch_norm";
constexpr const char* kBackward = "batchops.batch_norm_backward";
constexpr const char* kStats = "batchops.batch_norm_stats";
constexpr const char* kElemt = "batchops.batch_norm_backward_elemt";

bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

BatchNormLayout make_layout(const at::Tensor& x, at::MemoryFormat format) {
  BatchNormLayout l;
  l.format = format;
  l.N = x.size(0);
  l.C = x.size(1);
  l.inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) l.inner *= x.size(d);
  l.rows = format != at::MemoryFormat::Contiguous || l.inner == 1;
  return l;
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() >= 2 && input.dim() <= 5, op, ": expected input of 2 to 5 dimensions (N, C, *), got ",
                    input.dim(), "-D input of shape ", input.sizes());
  check_floating_input(op, input);
}

// Per-channel tensors: right size, same device, dtype equal to the input's or float32 for
// half inputs (as torch's mixed-precision batch norm allows).
at::Tensor check_per_channel(const char* op, const char* name, const std::optional<at::Tensor>& t,
                             const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const int64_t C = input.size(1);
  check_same_device(op, name, *t, input);
  TORCH_CHECK(t->numel() == C, op, ": ", name, " has ", t->numel(), " elements, expected ", C,
              " (one per channel of input with shape ", input.sizes(), ")");
  const auto dt = t->scalar_type();
  TORCH_CHECK(dt == input.scalar_type() || (is_reduced(input.scalar_type()) && dt == at::kFloat), op, ": ", name,
              " has dtype ", dt, " but input has dtype ", input.scalar_type(),
              "; expected the same dtype, or float32 for a float16/bfloat16 input");
  return *t;
}

at::Tensor as_stat(const at::Tensor& t, at::ScalarType stat) {
  return t.defined() ? t.to(stat).contiguous() : t;
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  check_same_device(op, name, t, input);
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected the input's shape ",
              input.sizes());
  check_same_dtype(op, name, t, input);
}

}  // namespace

BatchNormForwardPlan plan_batch_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& residual,
                                             const std::optional<at::Tensor>& running_mean,
                                             const std::optional<at::Tensor>& running_var, bool training,
                                             double momentum, const std::optional<at::Tensor>& momentum_tensor,
                                             double eps, std::optional<c10::string_view> activation) {
  check_input(kForward, input);
  BatchNormForwardPlan p;
  p.activation = parse_activation(activation, kForward);
  p.training = training;
  p.eps = eps;
  p.momentum = momentum;
  const auto stat = batch_norm_stat_dtype(input.scalar_type());

  at::Tensor w = check_per_channel(kForward, "weight", weight, input);
  at::Tensor b = check_per_channel(kForward, "bias", bias, input);
  at::Tensor rm = check_per_channel(kForward, "running_mean", running_mean, input);
  at::Tensor rv = check_per_channel(kForward, "running_var", running_var, input);
  if (training) {
    TORCH_CHECK_VALUE(rm.defined() == rv.defined(), kForward,
                      ": running_mean and running_var must either both be None or neither be None");
    TORCH_CHECK_VALUE(eps > 0, kForward, ": eps must be positive during training, got ", eps);
    const int64_t per_channel = input.numel() / std::max<int64_t>(input.size(1), 1);
    TORCH_CHECK_VALUE(per_channel != 1, kForward, ": expected more than 1 value per channel when training, got input of shape ",
                      input.sizes());
  } else {
    TORCH_CHECK_VALUE(eps >= 0, kForward, ": eps must be non-negative, got ", eps);
    TORCH_CHECK(rm.defined(), kForward, ": running_mean must be defined in evaluation mode (training=False)");
    TORCH_CHECK(rv.defined(), kForward, ": running_var must be defined in evaluation mode (training=False)");
  }
  if (momentum_tensor.has_value() && momentum_tensor->defined()) {
    TORCH_CHECK(momentum_tensor->numel() == 1, kForward, ": momentum_tensor must have one element, got ",
                momentum_tensor->numel());
    check_same_device(kForward, "momentum_tensor", *momentum_tensor, input);
    p.momentum_tensor = momentum_tensor->to(stat).reshape({1});
  }

  const auto format = choose_format(input);
  p.layout = make_layout(input, format);
  p.input = input.contiguous(format);
  if (residual.has_value() && residual->defined()) {
    check_same_shape(kForward, "residual", *residual, input);
    p.residual = residual->contiguous(format);
  }
  p.weight = as_stat(w, stat);
  p.bias = as_stat(b, stat);
  p.update_running = training && rm.defined();
  if (rm.defined()) {
    p.running_dtype = rm.scalar_type();
    p.running_mean = as_stat(rm, stat);
    p.running_var = as_stat(rv, stat);
  }

  const int64_t C = p.layout.C;
  auto stat_opts = input.options().dtype(stat);
  p.output = at::empty(input.sizes(), input.options().memory_format(format));
  p.save_mean = at::empty({C}, stat_opts);
  p.save_invstd = at::empty({C}, stat_opts);
  if (p.update_running) {
    p.new_running_mean = at::empty({C}, stat_opts);
    p.new_running_var = at::empty({C}, stat_opts);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_batch_norm_forward(
    BatchNormForwardPlan& p) {
  at::Tensor nrm, nrv;
  if (p.update_running) {
    nrm = p.new_running_mean.to(p.running_dtype);
    nrv = p.new_running_var.to(p.running_dtype);
  } else {
    nrm = at::empty({0}, p.save_mean.options());
    nrv = at::empty({0}, p.save_mean.options());
  }
  return {p.output, p.save_mean, p.save_invstd, nrm, nrv};
}

BatchNormBackwardPlan plan_batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& residual,
                                               const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                               bool training, std::optional<c10::string_view> activation,
                                               std::array<bool, 4> output_mask) {
  check_input(kBackward, input);
  BatchNormBackwardPlan p;
  p.activation = parse_activation(activation, kBackward);
  p.training = training;
  p.mask = output_mask;
  const auto stat = batch_norm_stat_dtype(input.scalar_type());
  check_same_shape(kBackward, "grad_output", grad_output, input);
  at::Tensor w = check_per_channel(kBackward, "weight", weight, input);
  at::Tensor b = check_per_channel(kBackward, "bias", bias, input);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"save_mean", save_mean},
                                {"save_invstd", save_invstd}}) {
    check_same_device(kBackward, name, t, input);
    TORCH_CHECK(t.numel() == input.size(1), kBackward, ": ", name, " has ", t.numel(), " elements, expected ",
                input.size(1));
  }
  const auto format = choose_format(input);
  p.layout = make_layout(input, format);
  p.input = input.contiguous(format);
  p.grad_output = grad_output.contiguous(format);
  if (residual.has_value() && residual->defined()) {
    check_same_shape(kBackward, "residual", *residual, input);
    p.residual = residual->contiguous(format);
  }
  p.weight_dtype = w.defined() ? w.scalar_type() : stat;
  p.bias_dtype = b.defined() ? b.scalar_type() : stat;
  p.weight = as_stat(w, stat);
  p.bias = as_stat(b, stat);
  p.save_mean = save_mean.to(stat).contiguous();
  p.save_invstd = save_invstd.to(stat).contiguous();

  const int64_t C = p.layout.C;
  auto act_opts = input.options().memory_format(format);
  auto stat_opts = input.options().dtype(stat);
  if (p.mask[0]) p.grad_input = at::empty(input.sizes(), act_opts);
  if (p.mask[1]) p.grad_weight = at::empty({C}, stat_opts);
  if (p.mask[2]) p.grad_bias = at::empty({C}, stat_opts);
  if (p.mask[3]) p.grad_residual = at::empty(input.sizes(), act_opts);
  return p;
}

BatchNormStatsPlan plan_batch_norm_stats(const at::Tensor& input) {
  check_input(kStats, input);
  BatchNormStatsPlan p;
  const auto format = choose_format(input);
  p.layout = make_layout(input, format);
  p.input = input.contiguous(format);
  auto stat_opts = input.options().dtype(batch_norm_stat_dtype(input.scalar_type()));
  p.mean = at::empty({p.layout.C}, stat_opts);
  p.m2 = at::empty({p.layout.C}, stat_opts);
  return p;
}

BatchNormBackwardPlan plan_batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                                     const at::Tensor& mean_g, const at::Tensor& mean_gxhat,
                                                     std::optional<c10::string_view> activation,
                                                     std::array<bool, 2> output_mask) {
  auto p = plan_batch_norm_backward(grad_output, input, weight, bias, residual, save_mean, save_invstd,
                                    /*training=*/false, activation, {output_mask[0], false, false, output_mask[1]});
  const auto stat = batch_norm_stat_dtype(input.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean_g", mean_g},
                                {"mean_gxhat", mean_gxhat}}) {
    check_same_device(kElemt, name, t, input);
    TORCH_CHECK(t.numel() == input.size(1), kElemt, ": ", name, " has ", t.numel(), " elements, expected ",
                input.size(1));
  }
  p.mean_g = mean_g.to(stat).contiguous();
  p.mean_gxhat = mean_gxhat.to(stat).contiguous();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_batch_norm_backward(BatchNormBackwardPlan& p) {
  // Gradients that were not asked for come back as empty tensors (the Python layer maps
  // them to None); the fake kernel mirrors this exactly.
  auto none = [&] { return at::empty({0}, p.input.options()); };
  return {p.mask[0] ? p.grad_input : none(), p.mask[1] ? p.grad_weight.to(p.weight_dtype) : none(),
          p.mask[2] ? p.grad_bias.to(p.bias_dtype) : none(), p.mask[3] ? p.grad_residual : none()};
}

}  // namespace batchops
