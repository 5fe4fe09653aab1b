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
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <functional>
#include <initializer_list>
#include <memory>
#include <type_traits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/op.h"

namespace batchops::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using OptName = std::optional<c10::string_view>;  // an activation name, as the schemas take it

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

// ---------------------------------------------------------------------------------------
// Hand-written backward nodes, as torch's generated ones (NativeBatchNormBackward0) are written,
// for ops whose per-call cost matters: a torch::autograd::Function costs ~7 us more per forward +
// backward (VariableInfo per input and output, _wrap_outputs' checks, a node even when nothing
// requires grad, saved_data's string map). A node subclass keeps SavedVariables and plain fields,
// asks task_should_compute_output(i) for input i's gradient and returns one gradient per next edge.

// torch 2.11 holds graph nodes in std::shared_ptr (freed through torch's deleteNode, which unlinks
// long chains without recursion), 2.14 in c10::intrusive_ptr; Edge::function says which.
using NodePtr = decltype(torch::autograd::Edge::function);

namespace detail {
// Unqualified on purpose: a dependent call, found by argument-dependent lookup in torch::autograd
// (the node's base class) only where it exists, i.e. where the graph uses std::shared_ptr.
template <typename N>
void delete_node(N* node) {
  deleteNode(node);
}
}  // namespace detail

template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N(), &detail::delete_node<N>);
  } else {
    return c10::make_intrusive<N>();
  }
}

// What the generated autograd kernels check before they build a node, with torch's messages and
// error types: an op without a forward-mode derivative refuses dual tensors
// (NotImplementedError) instead of silently dropping their tangents ...
inline void refuse_forward_ad(const char* op, std::initializer_list<std::optional<at::Tensor>> differentiable) {
  for (const auto& t : differentiable) {
    TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(t), "Trying to use forward AD with batchops.", op,
                                " that does not support it.");
  }
}
// ... and an argument it has no gradient for must not require one (RuntimeError).
inline void check_not_differentiable(const std::optional<at::Tensor>& t, const char* arg, const char* op) {
  TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad() && at::GradMode::is_enabled()),
              "The function 'batchops.", op, "' is not differentiable with respect to argument '", arg,
              "'. This input cannot have requires_grad True.");
}

// Unrequested gradients come back from the ops as empty tensors; autograd wants undefined ones.
inline at::Tensor requested(const at::Tensor& grad, bool wanted) { return wanted ? grad : at::Tensor(); }

// ---------------------------------------------------------------------------------------
// The Autograd kernels, generic over an op's signature (common/op.h), so that no op restates it.

namespace detail {
// Function::apply's arguments: activation names cross as std::string (see name_string).
template <typename T>
decltype(auto) for_apply(T&& value) {
  return std::forward<T>(value);
}
inline std::optional<std::string> for_apply(std::optional<c10::string_view> name) { return name_string(name); }

// An op's results from / to a variable_list.
template <typename Ret>
struct Results;
template <>
struct Results<at::Tensor> {
  static at::Tensor from(variable_list&& v) { return std::move(v[0]); }
  static variable_list to(at::Tensor&& t) { return {std::move(t)}; }
};
template <typename... Ts>
struct Results<std::tuple<Ts...>> {
  static std::tuple<Ts...> from(variable_list&& v) { return from(std::move(v), std::index_sequence_for<Ts...>{}); }
  static variable_list to(std::tuple<Ts...>&& t) {
    return std::apply([](auto&&... x) { return variable_list{std::move(x)...}; }, std::move(t));
  }

 private:
  template <size_t... I>
  static std::tuple<Ts...> from(variable_list&& v, std::index_sequence<I...>) {
    return {std::move(v[I])...};
  }
};

// The tensor arguments of a call, in order (an absent optional one as an undefined tensor).
inline void collect_tensor(std::vector<at::Tensor>& out, const at::Tensor& t) { out.push_back(t); }
inline void collect_tensor(std::vector<at::Tensor>& out, const std::optional<at::Tensor>& t) {
  out.push_back(value_or_undefined(t));
}
template <typename T>
void collect_tensor(std::vector<at::Tensor>&, const T&) {}
}  // namespace detail

// A forward op's Autograd kernel: runs `Function` (a torch::autograd::Function whose forward
// takes the op's arguments, names as std::string) and returns its outputs as the op's results.
//   impl_op<MyForwardOp>(m, &FunctionKernel<MyFunction, MyForwardOp::Sig>::call);
template <typename Function, typename Sig>
struct FunctionKernel;
template <typename Function, typename Ret, typename... Args>
struct FunctionKernel<Function, Ret(Args...)> {
  static Ret call(Args... args) { return detail::Results<Ret>::from(Function::apply(detail::for_apply(args)...)); }
};

// A backward op's Autograd kernel: the op below autograd, refusing a gradient of its gradient
// with Op::double_backward_error (call_backward_op).
//   impl_op<MyBackwardOp>(m, &NoDoubleBackwardKernel<MyBackwardOp>::call);
template <typename Op, typename Sig = typename Op::Sig>
struct NoDoubleBackwardKernel;
template <typename Op, typename Ret, typename... Args>
struct NoDoubleBackwardKernel<Op, Ret(Args...)> {
  static Ret call(Args... args) {
    std::vector<at::Tensor> tensors;
    (detail::collect_tensor(tensors, args), ...);
    variable_list out = call_backward_op(
        tensors, [&]() -> variable_list { return detail::Results<Ret>::to(op_handle<Op>().call(args...)); },
        Op::double_backward_error);
    return detail::Results<Ret>::from(std::move(out));
  }
};

}  // namespace batchops::autograd
