// What the ops' C++ autograd kernels share (batch_norm/, linear/, max_pool/, packing/autograd.cpp).
//
// Why autograd in C++ at all: torch.library.register_autograd runs ~40-60 us of Python per
// forward + backward (autograd_impl, fill_defaults, Function.apply, setup_context, the
// backward's redispatch), as long as a small layer's whole step on the CPU. Fake kernels stay
// in Python (batchops/ops/); torch.compile traces through these kernels as it does through
// torch's own.
//
// Why hand-written nodes, not torch::autograd::Function: each forward op's Autograd kernel builds
// a backward node (a torch::autograd::Node subclass) the way torch's generated kernels build
// theirs (NativeBatchNormBackward0): only when a gradient can flow, with SavedVariables and plain
// fields. A Function builds its node on every call, nothing requiring grad included, with
// metadata per input and output and a string-keyed map for the context: a batch-norm training
// call (2x8x2x2, forward + autograd.grad) took 120 us that way and 92 this way (torch's: 86-91), an
// eval module call 20 us and 15 (torch's: 18).
//
// The pattern (batch_norm/autograd.cpp is the fullest example; BackwardNode below):
//   struct MyBackward final : BackwardNode<MyBackward> {
//     std::string name() const override;                 // the profiler's and grad_fn's name
//     auto fields() { return std::tie(input, alpha); }   // what backward reads
//     static variable_list backward(grads, needed, const Tensor& input, const double& alpha);
//     SavedVariable input; double alpha;
//   };
//   auto node = node_for<MyBackward>(MyOp::name, input, weight);  // the differentiable inputs
//   auto out = call_below_autograd<MyOp>(args...);
//   if (node) { set_history(out, node); node->input = SavedVariable(input, false); ... }
// BackwardNode gives the node apply (under mutex_, which release_variables may take on another
// thread), release_variables and compiled autograd's compiled_args / apply_with_saved, all from
// fields() and backward.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>  // NoDoubleBackward below
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <cctype>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/op.h"

namespace batchops::autograd {

using torch::autograd::AutogradContext;  // NoDoubleBackward
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using OptName = std::optional<c10::string_view>;  // an activation name, as the schemas take it

// Activation names are kept in nodes as std::string (the schema's string_view would dangle).
inline std::optional<std::string> name_string(std::optional<c10::string_view> name) {
  return name ? std::optional<std::string>(std::string(name->data(), name->size())) : std::nullopt;
}
inline std::optional<c10::string_view> name_view(const std::optional<std::string>& name) {
  return name ? std::optional<c10::string_view>(c10::string_view(*name)) : std::nullopt;
}

inline at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); }
inline std::optional<at::Tensor> optional_if_defined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

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
// Building backward nodes (see the top of this file).

// torch 2.11 holds graph nodes in std::shared_ptr (freed through torch's deleteNode, which unlinks
// long chains without recursion), 2.14 in c10::intrusive_ptr; Edge::function says which.
using NodePtr = decltype(torch::autograd::Edge::function);
using torch::autograd::SavedVariable;

namespace detail {
// Unqualified on purpose: a dependent call, found by argument-dependent lookup in torch::autograd
// (the node's base class) only where it exists, i.e. where the graph uses std::shared_ptr.
template <typename N>
void delete_node(N* node) {
  deleteNode(node);
}

template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N(), &delete_node<N>);
  } else {
    return c10::make_intrusive<N>();
  }
}
}  // namespace detail

// The node for a call of `op` whose differentiable arguments are `inputs` (Tensor or optional
// Tensor; the node's next edges, in this order), or a null pointer when no gradient can flow
// (grad mode off or none requires grad). Built before the op runs, as torch's generated kernels
// do: the node takes the next sequence number, which orders the backward pass. As they do, it
// refuses dual tensors (forward-mode AD: NotImplementedError) instead of dropping the tangents.
template <typename N, typename... Inputs>
auto node_for(const char* op, const Inputs&... inputs) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(torch::autograd::isFwGradDefined(inputs) || ...),
                              "Trying to use forward AD with batchops.", op, " that does not support it.");
  decltype(detail::make_node<N>()) node;
  if (torch::autograd::compute_requires_grad(inputs...)) {
    node = detail::make_node<N>();
    node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  }
  return node;
}

// The base of every backward node (the pattern: top of this file). The node lists its fields
// (SavedVariable, SavedOutput for an output of the forward op, whose grad_fn is this node, and
// plain values) and writes backward as a static function of the gradients, `needed` (whether
// next edge i wants a gradient: false for an absent input) and the fields in order, each saved
// variable as its tensor (undefined when it was absent), each plain field as it is. backward must
// only call ops: under compiled autograd it runs on the tensors of a graph being traced, as torch's
// generated nodes' functional backward does, and the plain fields must be types compiled autograd
// packs (bool, int64_t, double, std::string, c10::SymInt, vectors and optionals of them).
struct SavedOutput : SavedVariable {
  using SavedVariable::SavedVariable;
};

namespace detail {
template <typename Field>
using BackwardArg = std::conditional_t<std::is_base_of_v<SavedVariable, Field>, at::Tensor, Field>;
}  // namespace detail

template <typename Derived>
struct BackwardNode : public torch::autograd::Node {
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for_each_field([](auto& field) {
      if constexpr (std::is_base_of_v<SavedVariable, std::decay_t<decltype(field)>>) field.reset_data();
    });
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::apply(
        [&](auto&... field) { return Derived::backward(grads, needed_gradients(), unpack(field)...); },
        derived().fields());
  }

  // Compiled autograd (torch/csrc/dynamo/compiled_autograd.h): what identifies this node's
  // backward graph, and the backward as a call in that graph.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    const_cast<BackwardNode*>(this)->for_each_field([&](auto& field) {
      if constexpr (std::is_base_of_v<SavedVariable, std::decay_t<decltype(field)>>) {
        args.collect(field, std::is_same_v<std::decay_t<decltype(field)>, SavedOutput>);
      } else {
        args.collect(field);
      }
    });
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    namespace ca = torch::dynamo::autograd;
    for_each_field([&](auto& field) { saved.before(field); });
    const auto& python = ca::getPyCompilerInterface();
    // Bound once per process and node type (a name binds once), with a plain flag as torch's
    // generated nodes have: the capture holds the GIL, and a guarded static initialiser calling
    // into Python could wait on a thread that waits for the GIL.
    static bool bound = false;
    const std::string functional_name = python_identifier(name());
    if (!bound) {
      python->bind_function(saved.get_py_compiler(), functional_name, &BackwardNode::apply_functional,
                            schema(std::make_index_sequence<field_count()>{}));
      bound = true;
    }
    ca::PackedArgs args;
    args.pack(needed_gradients());
    std::apply([&](auto&... field) { (args.pack(to_packed(unpack(field))), ...); }, derived().fields());
    auto output_metadata = ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
        ca::get_input_metadata(next_edges()));
    variable_list result = python->call_function(saved.get_py_compiler(), "apply_functional", functional_name, grads,
                                                 args.vec(), output_metadata);
    for_each_field([&](auto& field) { saved.after(field); });
    return result;
  }

 private:
  // Derived is incomplete here: what depends on its fields is named in templates, used in bodies.
  template <typename N = Derived>
  using Fields = decltype(std::declval<N&>().fields());  // a tuple of references
  template <size_t I, typename N = Derived>
  using ArgAt = detail::BackwardArg<std::decay_t<std::tuple_element_t<I, Fields<N>>>>;
  template <typename N = Derived>
  static constexpr size_t field_count() {
    return std::tuple_size_v<Fields<N>>;
  }

  Derived& derived() { return static_cast<Derived&>(*this); }

  template <typename F>
  void for_each_field(F&& f) {
    std::apply([&](auto&... field) { (f(field), ...); }, derived().fields());
  }

  std::vector<bool> needed_gradients() {
    std::vector<bool> needed(num_outputs());
    for (size_t i = 0; i < needed.size(); ++i) needed[i] = task_should_compute_output(i);
    return needed;
  }

  // What backward gets for a field: a saved variable's tensor, a plain field as it is.
  template <typename T>
  decltype(auto) unpack(const T& field) {
    if constexpr (std::is_same_v<T, SavedOutput>) {
      return at::Tensor(field.unpack(getptr()));
    } else if constexpr (std::is_base_of_v<SavedVariable, T>) {
      return at::Tensor(field.unpack());
    } else {
      return (field);  // const T&
    }
  }

  // The graph's code names the bound function: "batchops::BatchNormBackward" -> batchops__BatchNormBackward.
  static std::string python_identifier(std::string name) {
    for (char& c : name) c = std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
    return name;
  }

  // The packed types of apply_functional's arguments: `needed`, then each field as to_packed gives it.
  template <size_t... I>
  static std::vector<at::TypePtr> schema(std::index_sequence<I...>) {
    namespace ca = torch::dynamo::autograd;
    return {ca::IValuePacker<std::vector<bool>>::packed_type(),
            ca::IValuePacker<decltype(to_packed(std::declval<const ArgAt<I>&>()))>::packed_type()...};
  }

  // The backward as compiled autograd calls it, on what apply_with_saved packed.
  static variable_list apply_functional(const variable_list& grads, const std::vector<at::IValue>& packed) {
    return apply_unpacked(grads, packed, std::make_index_sequence<field_count()>{});
  }
  template <size_t... I>
  static variable_list apply_unpacked(const variable_list& grads, const std::vector<at::IValue>& packed,
                                      std::index_sequence<I...>) {
    torch::dynamo::autograd::PackedArgs args(packed);
    const auto needed = args.unpack<std::vector<bool>>();
    // Braced initialisation: the arguments unpack in order.
    std::tuple<ArgAt<I>...> values{from_packed<ArgAt<I>>(args)...};
    return std::apply([&](const auto&... value) { return Derived::backward(grads, needed, value...); }, values);
  }

  // A tensor travels through compiled autograd's IValue packing as an optional (None when undefined).
  template <typename Value>
  static auto to_packed(const Value& value) {
    if constexpr (std::is_same_v<Value, at::Tensor>) {
      return optional_if_defined(value);
    } else {
      return value;
    }
  }
  template <typename Value>
  static Value from_packed(torch::dynamo::autograd::PackedArgs& args) {
    if constexpr (std::is_same_v<Value, at::Tensor>) {
      return value_or_undefined(args.unpack<std::optional<at::Tensor>>());
    } else {
      return args.unpack<Value>();
    }
  }
};

// The op below autograd (its CPU / CUDA kernel; the caller builds the graph).
template <typename Op, typename... Args>
auto call_below_autograd(const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op_handle<Op>().call(args...);
}

// `output`'s gradient flows into `node` (its next input).
template <typename N>
void set_history(const at::Tensor& output, const N& node) {
  torch::autograd::set_history(output, NodePtr(node));
}

// An argument the op has no gradient for must not require one, as torch's generated kernels
// check (RuntimeError, torch's message).
inline void check_not_differentiable(const std::optional<at::Tensor>& t, const char* arg, const char* op) {
  TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad() && at::GradMode::is_enabled()),
              "The function 'batchops.", op, "' is not differentiable with respect to argument '", arg,
              "'. This input cannot have requires_grad True.");
}

// Unrequested gradients come back from the ops as empty tensors; autograd wants undefined ones.
inline at::Tensor requested(const at::Tensor& grad, bool wanted) { return wanted ? grad : at::Tensor(); }

// ---------------------------------------------------------------------------------------
// The backward ops' Autograd kernel, generic over an op's signature (common/op.h).

namespace detail {
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
