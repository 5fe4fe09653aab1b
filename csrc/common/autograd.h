// What the ops' C++ autograd kernels share (linear/, batch_norm/, packing/autograd.cpp).
//
// Why autograd in C++ at all: torch.library.register_autograd runs ~40-60 us of Python per
// forward + backward (autograd_impl, fill_defaults, Function.apply, setup_context, the
// backward's redispatch), as long as a small layer's whole step on the CPU. Fake kernels stay
// in Python (batchops/ops/); torch.compile traces through these Functions as it does through
// torchvision's C++ autograd ops.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace batchops::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using OptName = std::optional<c10::string_view>;  // an activation name, as the schemas take it

// An op's typed handle; call it from a function-local static so the lookup happens once.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Activation names cross Function::apply as std::string (a string_view argument would dangle in
// the saved context) and are kept in the context as an IValue (None or a string).
inline std::optional<std::string> name_string(std::optional<c10::string_view> name) {
  return name ? std::optional<std::string>(std::string(name->data(), name->size())) : std::nullopt;
}
inline std::optional<c10::string_view> name_view(const std::optional<std::string>& name) {
  return name ? std::optional<c10::string_view>(c10::string_view(*name)) : std::nullopt;
}
inline c10::IValue name_ivalue(const std::optional<std::string>& name) {
  return name ? c10::IValue(*name) : c10::IValue();
}
inline std::optional<std::string> saved_name(AutogradContext* ctx, const std::string& key) {
  const c10::IValue& v = ctx->saved_data[key];
  return v.isNone() ? std::nullopt : std::optional<std::string>(v.toStringRef());
}

inline at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); }
inline std::optional<at::Tensor> optional_if_defined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Function::apply gives edges only to defined tensor arguments, and needs_input_grad takes the
// edge's index: this counts them. Call add with each tensor argument in order (an absent one,
// None, as an undefined tensor).
struct InputEdges {
  int next = 0;
  // The edge index of a tensor argument, or -1 when it is absent.
  int add(const at::Tensor& t) { return t.defined() ? next++ : -1; }
};
inline bool needs_grad(AutogradContext* ctx, int64_t edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

// The backward ops under autograd. Normally (no graph is being built) they run below autograd.
// When one could be (create_graph=True, or a caller with tensors that require grad), they run
// through this Function, whose outputs are differentiable and whose own backward raises: a
// gradient of the gradient then fails with `message` instead of silently coming back as None.
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  static variable_list forward(AutogradContext* ctx, at::TensorList /*edges only*/,
                               const std::function<variable_list()>& call, const std::string& message) {
    ctx->saved_data["message"] = message;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call();
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
  }
};

inline variable_list call_backward_op(at::TensorList inputs, const std::function<variable_list()>& call,
                                      const std::string& message) {
  bool differentiable = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : inputs) differentiable = differentiable || (t.defined() && t.requires_grad());
  }
  if (!differentiable) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call();
  }
  // Function::apply records every tensor argument's metadata: undefined ones (no bias) stay out.
  std::vector<at::Tensor> defined;
  for (const at::Tensor& t : inputs) {
    if (t.defined()) defined.push_back(t);
  }
  return NoDoubleBackward::apply(at::TensorList(defined), call, message);
}

// Unrequested gradients come back from the ops as empty tensors; autograd wants undefined ones.
inline at::Tensor requested(const at::Tensor& grad, bool wanted) { return wanted ? grad : at::Tensor(); }

}  // namespace batchops::autograd
