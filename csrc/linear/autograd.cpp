// Autograd for the four linear ops, in C++ (the Autograd dispatch key, both devices).
//
// Why not torch.library.register_autograd in Python, as the other ops do: a Python autograd
// step costs ~0.1 ms per forward + backward (autograd_impl, Function.apply, setup_context, the
// backward's redispatch), which is the whole runtime of a small layer (64 x 256 -> 256:
// 0.26 ms vs 0.17 ms here) and ~2% of the 8192 x 256 -> 256 benchmark step. Fake kernels stay
// in Python (batchops/ops/linear.py); torch.compile traces through these Functions as it does
// through torchvision's C++ autograd ops.
//
// Forward saves input, weight, bias and `saved` (the activation's derivative for silu / gelu*,
// see linear.h), plus the output for relu. `saved` is marked non-differentiable: it is for our
// backward only. Second derivatives are not supported: the backward ops' own autograd kernels
// raise when a gradient of the gradient is asked for.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <functional>
#include <optional>
#include <string>

namespace batchops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using OptName = std::optional<c10::string_view>;

constexpr const char* kDoubleBackwardError =
    "batchops.linear / batchops.grouped_linear: double backward (a gradient of the gradient) is not supported. "
    "Use torch.nn.functional.linear (per group) and the activation separately where second derivatives are needed.";

// The ops' typed handles, looked up once.
using ForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, OptName, bool);
using GroupedForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                     OptName, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                       const Tensor&, const Tensor&, OptName, std::array<bool, 3>);
using GroupedBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const OptTensor&, const OptTensor&, const Tensor&,
                                                              const Tensor&, OptName, std::array<bool, 3>);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op_handle(const char* name) {
  // One static per signature: each op has its own.
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return handle;
}
const auto& forward_op() { return op_handle<ForwardSig>("batchops::linear_forward"); }
const auto& grouped_forward_op() { return op_handle<GroupedForwardSig>("batchops::grouped_linear_forward"); }
const auto& backward_op() { return op_handle<BackwardSig>("batchops::linear_backward"); }
const auto& grouped_backward_op() { return op_handle<GroupedBackwardSig>("batchops::grouped_linear_backward"); }

bool saves_derivative(const std::optional<std::string>& act) {
  return act && (*act == "silu" || *act == "gelu" || *act == "gelu_tanh");
}

OptName name_view(const std::optional<std::string>& act) {
  return act ? OptName(c10::string_view(*act)) : OptName();
}

std::optional<std::string> name_string(OptName act) {
  return act ? std::optional<std::string>(std::string(act->data(), act->size())) : std::nullopt;
}

// What forward keeps besides the tensors (the activation travels as an IValue).
void save_context(AutogradContext* ctx, const std::optional<std::string>& act, bool save_for_backward) {
  ctx->saved_data["activation"] = act ? c10::IValue(*act) : c10::IValue();
  ctx->saved_data["save_for_backward"] = save_for_backward;
  // `saved` gets no gradient; without this autograd would hand backward a zero-filled tensor
  // of its full size, one more pass over (rows, out_features) per backward.
  ctx->set_materialize_grads(false);
}

std::optional<std::string> saved_activation(AutogradContext* ctx) {
  const c10::IValue& v = ctx->saved_data["activation"];
  return v.isNone() ? std::nullopt : std::optional<std::string>(v.toStringRef());
}

void check_saved(AutogradContext* ctx, const std::optional<std::string>& act) {
  TORCH_CHECK(ctx->saved_data["save_for_backward"].toBool() || !saves_derivative(act),
              "batchops linear backward: the forward op ran with save_for_backward=False, so it saved nothing for "
              "the backward of activation '", *act, "'; call it with save_for_backward=True (batchops.functional "
              "does when a gradient is needed)");
}

Tensor empty_like_input(const Tensor& t) { return at::empty({0}, t.options()); }

std::array<bool, 3> grad_mask(AutogradContext* ctx, bool has_bias) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)};
}

// Unrequested gradients come back from the ops as empty tensors; autograd wants undefined ones.
Tensor requested(const Tensor& g, bool wanted) { return wanted ? g : Tensor(); }

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                               std::optional<std::string> activation, bool save_for_backward) {
    Tensor output, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, saved) = forward_op().call(input, weight, bias, name_view(activation), save_for_backward);
    }
    const bool relu = activation && *activation == "relu";  // relu's backward reads the output
    ctx->save_for_backward({input, weight, bias.value_or(Tensor()), relu ? output : Tensor(), saved});
    save_context(ctx, activation, save_for_backward);
    ctx->mark_non_differentiable({saved});
    return {output, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &weight = s[1], &bias = s[2], &output = s[3], &saved = s[4];
    const auto mask = grad_mask(ctx, bias.defined());
    const variable_list none(5);
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2])) return none;
    const auto act = saved_activation(ctx);
    check_saved(ctx, act);
    auto [gi, gw, gb] = backward_op().call(grad_output, input, weight, bias.defined() ? OptTensor(bias) : std::nullopt,
                                           output.defined() ? output : empty_like_input(input), saved,
                                           name_view(act), mask);
    return {requested(gi, mask[0]), requested(gw, mask[1]), requested(gb, mask[2]), Tensor(), Tensor()};
  }
};

struct GroupedLinearFunction : public torch::autograd::Function<GroupedLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& group_sizes, std::optional<std::string> activation,
                               bool save_for_backward) {
    Tensor output, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, saved) =
          grouped_forward_op().call(input, weight, bias, group_sizes, name_view(activation), save_for_backward);
    }
    const bool relu = activation && *activation == "relu";
    ctx->save_for_backward({input, weight, bias.value_or(Tensor()), group_sizes.value_or(Tensor()),
                            relu ? output : Tensor(), saved});
    save_context(ctx, activation, save_for_backward);
    ctx->mark_non_differentiable({saved});
    return {output, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_output = grads[0];
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &weight = s[1], &bias = s[2], &sizes = s[3], &output = s[4], &saved = s[5];
    const auto mask = grad_mask(ctx, bias.defined());
    const variable_list none(6);
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2])) return none;
    const auto act = saved_activation(ctx);
    check_saved(ctx, act);
    auto [gi, gw, gb] = grouped_backward_op().call(
        grad_output, input, weight, bias.defined() ? OptTensor(bias) : std::nullopt,
        sizes.defined() ? OptTensor(sizes) : std::nullopt, output.defined() ? output : empty_like_input(input), saved,
        name_view(act), mask);
    return {requested(gi, mask[0]), requested(gw, mask[1]), requested(gb, mask[2]), Tensor(), Tensor(), Tensor()};
  }
};

// The backward ops under autograd: differentiable outputs whose own backward refuses, so a
// gradient of the gradient raises instead of silently coming back as None.
using BackwardCall = std::function<std::tuple<Tensor, Tensor, Tensor>()>;

struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  // The six tensors are arguments only so that autograd connects the outputs to them.
  static variable_list forward(AutogradContext*, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, const BackwardCall& call) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, gw, gb] = call();
    return {gi, gw, gb};
  }
  static variable_list backward(AutogradContext*, variable_list) { TORCH_CHECK(false, kDoubleBackwardError); }
};

// grad_output, input, weight, bias (undefined if none), output, saved.
using BackwardInputs = std::array<const Tensor*, 6>;

std::tuple<Tensor, Tensor, Tensor> backward_op_under_autograd(const BackwardInputs& in, const BackwardCall& call) {
  bool differentiable = false;
  if (at::GradMode::is_enabled()) {
    for (const Tensor* t : in) differentiable = differentiable || (t->defined() && t->requires_grad());
  }
  if (!differentiable) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call();
  }
  auto out = NoDoubleBackward::apply(*in[0], *in[1], *in[2], *in[3], *in[4], *in[5], call);
  return {out[0], out[1], out[2]};
}

// --- the Autograd kernels, with the schemas' signatures ---------------------------------

std::tuple<Tensor, Tensor> linear_forward_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                                   OptName activation, bool save_for_backward) {
  auto out = LinearFunction::apply(input, weight, bias, name_string(activation), save_for_backward);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> grouped_linear_forward_autograd(const Tensor& input, const Tensor& weight,
                                                           const OptTensor& bias, const OptTensor& group_sizes,
                                                           OptName activation, bool save_for_backward) {
  auto out = GroupedLinearFunction::apply(input, weight, bias, group_sizes, name_string(activation),
                                          save_for_backward);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> linear_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                                            const Tensor& weight, const OptTensor& bias,
                                                            const Tensor& output, const Tensor& saved,
                                                            OptName activation, std::array<bool, 3> mask) {
  const Tensor b = bias.value_or(Tensor());
  return backward_op_under_autograd({&grad_output, &input, &weight, &b, &output, &saved}, [&] {
    return backward_op().call(grad_output, input, weight, bias, output, saved, activation, mask);
  });
}

std::tuple<Tensor, Tensor, Tensor> grouped_linear_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const OptTensor& bias,
    const OptTensor& group_sizes, const Tensor& output, const Tensor& saved, OptName activation,
    std::array<bool, 3> mask) {
  const Tensor b = bias.value_or(Tensor());
  return backward_op_under_autograd({&grad_output, &input, &weight, &b, &output, &saved}, [&] {
    return grouped_backward_op().call(grad_output, input, weight, bias, group_sizes, output, saved, activation,
                                      mask);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(batchops, Autograd, m) {
  m.impl("linear_forward", &linear_forward_autograd);
  m.impl("grouped_linear_forward", &grouped_linear_forward_autograd);
  m.impl("linear_backward", &linear_backward_autograd);
  m.impl("grouped_linear_backward", &grouped_linear_backward_autograd);
}

}  // namespace batchops
