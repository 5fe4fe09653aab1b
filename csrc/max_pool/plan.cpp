// Argument checks and layouts for max_pool2d, both devices; the messages and error types are
// torch's for the same mistakes (RuntimeError), prefixed with the op and naming the argument.
#include "max_pool/max_pool.h"
#include "batch_norm/batch_norm.h"  // batch_norm_stat_dtype: the coefficients are batch norm's
#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

namespace batchops {
namespace {

constexpr const char* kOp = "batchops.max_pool2d";

// (height, width) from a list of one or two numbers (an empty stride: the kernel size).
std::pair<int64_t, int64_t> pair_arg(const char* name, at::IntArrayRef v, const char* shape_text) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, kOp, ": ", name, " must ", shape_text, ", got ", v);
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

// torch's pooling_output_shape: with ceil_mode the last window must start inside the input or
// its left padding.
int64_t output_size(const PoolAxis& a, bool ceil_mode) {
  const int64_t span = a.in + 2 * a.padding - a.dilation * (a.kernel - 1) - 1 + (ceil_mode ? a.stride - 1 : 0);
  int64_t out = (span >= 0 ? span / a.stride : -((-span + a.stride - 1) / a.stride)) + 1;
  if (ceil_mode && (out - 1) * a.stride >= a.in + a.padding) --out;
  return out;
}

// The window arguments, checked, into p.h and p.w.
void set_window(MaxPool2dPlan& p, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation) {
  std::tie(p.h.kernel, p.w.kernel) = pair_arg("kernel_size", kernel_size, "be a single int or a tuple of two ints");
  if (stride.empty()) {
    p.h.stride = p.h.kernel, p.w.stride = p.w.kernel;
  } else {
    std::tie(p.h.stride, p.w.stride) = pair_arg("stride", stride, "be omitted, a single int or a tuple of two ints");
  }
  std::tie(p.h.padding, p.w.padding) = pair_arg("padding", padding, "be a single int or a tuple of two ints");
  std::tie(p.h.dilation, p.w.dilation) = pair_arg("dilation", dilation, "be a single int or a tuple of two ints");
  TORCH_CHECK(p.h.kernel > 0 && p.w.kernel > 0, kOp, ": kernel_size must be greater than zero, got ", kernel_size);
  TORCH_CHECK(p.h.stride > 0 && p.w.stride > 0, kOp, ": stride must be greater than zero, got ", stride);
  TORCH_CHECK(p.h.dilation > 0 && p.w.dilation > 0, kOp, ": dilation must be greater than zero, got ", dilation);
  TORCH_CHECK(p.h.padding >= 0 && p.w.padding >= 0 && p.h.padding <= p.h.kernel / 2 && p.w.padding <= p.w.kernel / 2,
              kOp, ": padding must be non-negative and at most half of kernel_size, got padding ", padding,
              " and kernel_size ", kernel_size);
}

// The layout a 4-D tensor is computed in, as torch's CPU pooling chooses it.
at::MemoryFormat pool_format(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

}  // namespace

MaxPool2dPlan plan_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const int64_t dim = input.dim();
  TORCH_CHECK((dim == 3 || dim == 4) && input.size(dim - 1) > 0 && input.size(dim - 2) > 0 && input.size(dim - 3) > 0,
              kOp, ": input must be (N, C, H, W) or (C, H, W) with C, H and W non-zero, got shape ", input.sizes());
  check_floating_input(kOp, input);
  MaxPool2dPlan p;
  set_window(p, kernel_size, stride, padding, dilation);
  p.batch = dim == 4 ? input.size(0) : 1;
  p.channels = input.size(dim - 3);
  p.h.in = input.size(dim - 2), p.w.in = input.size(dim - 1);
  p.h.out = output_size(p.h, ceil_mode), p.w.out = output_size(p.w, ceil_mode);
  TORCH_CHECK(p.h.out > 0 && p.w.out > 0, kOp, ": input of size ", p.h.in, "x", p.w.in, " gives output size ",
              p.h.out, "x", p.w.out, " with kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding,
              " and dilation ", dilation, ": output size is too small");
  const auto format = pool_format(input);
  p.channels_last = format == at::MemoryFormat::ChannelsLast;
  p.input = input.contiguous(format);
  auto sizes = input.sizes().vec();
  sizes[dim - 2] = p.h.out, sizes[dim - 1] = p.w.out;
  p.output = at::empty(sizes, input.options().memory_format(format));
  p.indices = at::empty(sizes, input.options().dtype(at::kLong).memory_format(format));
  return p;
}

MaxPool2dPlan plan_max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                       at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "batchops.max_pool2d_backward";
  const int64_t dim = indices.dim();
  TORCH_CHECK(dim == 3 || dim == 4, op, ": indices must be (N, C, H_out, W_out) or (C, H_out, W_out), got shape ",
              indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(grad_output.sizes() == indices.sizes(), op, ": grad_output's shape ", grad_output.sizes(),
              " differs from indices' ", indices.sizes());
  check_same_device(op, "indices", indices, grad_output);
  check_floating_input(op, grad_output);
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == dim && input_size.slice(0, dim - 2) == indices.sizes().slice(0, dim - 2),
              op, ": input_size ", input_size, " does not match indices of shape ", indices.sizes());
  MaxPool2dPlan p;
  set_window(p, kernel_size, stride, padding, dilation);
  p.batch = dim == 4 ? input_size[0] : 1;
  p.channels = input_size[dim - 3];
  p.h.in = input_size[dim - 2], p.w.in = input_size[dim - 1];
  p.h.out = indices.size(dim - 2), p.w.out = indices.size(dim - 1);
  // The window arguments must be the forward's (with either ceil_mode), as torch's backward checks:
  // the CUDA kernel finds an input's windows from them (the CPU's scatters by index), so other
  // arguments would silently drop gradient there.
  for (const PoolAxis* a : {&p.h, &p.w}) {
    TORCH_CHECK(a->out == output_size(*a, false) || a->out == output_size(*a, true), op, ": indices of shape ",
                indices.sizes(), " are not max_pool2d's output for input_size ", input_size, " with kernel_size ",
                kernel_size, ", stride ", stride, ", padding ", padding, " and dilation ", dilation);
  }
  // The forward made the indices in the input's layout; the gradient takes it back. Read from the
  // strides (suggest_memory_format), not from contiguity: a 1x1 output's indices are contiguous in
  // both layouts, and only their strides still say channels-last.
  const auto format = pool_format(indices);
  p.channels_last = format == at::MemoryFormat::ChannelsLast;
  p.indices = indices.contiguous(format);
  p.grad_output = grad_output.contiguous(format);
  p.grad_input = at::empty(input_size, grad_output.options().memory_format(format));
  return p;
}

MaxPool2dPlan plan_max_pool2d_batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                                  const at::Tensor& input, const at::Tensor& coefficients,
                                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "batchops.max_pool2d_batch_norm_backward";
  check_same_device(op, "input", input, grad_output);
  check_same_device(op, "coefficients", coefficients, grad_output);
  TORCH_CHECK(input.scalar_type() == grad_output.scalar_type(), op, ": input's dtype ", input.scalar_type(),
              " differs from grad_output's ", grad_output.scalar_type());
  auto p = plan_max_pool2d_backward(grad_output, indices, input.sizes(), kernel_size, stride, padding, dilation);
  const auto stat = batch_norm_stat_dtype(grad_output.scalar_type());
  TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(0) == 4 && coefficients.size(1) == p.channels, op,
              ": coefficients must be (4, C) = (4, ", p.channels, "), got shape ", coefficients.sizes());
  TORCH_CHECK(coefficients.scalar_type() == stat, op, ": coefficients must be ", stat, " for ",
              grad_output.scalar_type(), " gradients, got ", coefficients.scalar_type());
  p.bn_input = input.contiguous(pool_format(p.indices));
  p.bn_coefficients = coefficients.contiguous();
  return p;
}

void apply_batch_norm_coefficients(MaxPool2dPlan& p) {
  const int64_t dim = p.grad_input.dim();
  std::vector<int64_t> shape(dim, 1);
  shape[dim - 3] = p.channels;
  const auto per_channel = [&](int64_t row) { return p.bn_coefficients[row].view(shape); };
  const auto stat = p.bn_coefficients.scalar_type();
  const auto normalised = p.bn_input.to(stat).sub(per_channel(2)).mul(per_channel(1)).add(per_channel(3));
  const auto result = p.grad_input.to(stat).mul(per_channel(0)).add(normalised);
  p.grad_input.copy_(result);
}

}  // namespace batchops
