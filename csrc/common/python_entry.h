// A shorter way in from Python for an op called with plain tensors in eager mode.
//
// torch.ops.batchops.<op>(...) parses its arguments against the schema (IValues, overload
// resolution, __torch_function__ checks): about 2.5 us for batch_norm_forward's 11 arguments,
// as long as the op itself takes at 16x8x4x4, and it is paid on every batch-norm, linear and
// max-pool call a model makes. python_entry<Op> converts the positional arguments by the op's
// C++ signature (Op::Sig, common/op.h) and calls the same dispatcher handle, so dispatch keys,
// autograd, dispatch modes, the profiler and the kernels are exactly torch.ops'. It takes only
// what it converts exactly: plain tensors (torch.Tensor or nn.Parameter, no torch-function mode
// active), None, Python bools, ints and floats, strings and lists or tuples of them. For
// anything else (a tensor subclass such as FakeTensor, an fx Proxy, a NumPy scalar, a missing
// argument) it returns NotImplemented and the Python wrapper calls torch.ops, which handles it
// and raises torch's error for bad input (batchops/ops/common.py: op_caller).
#pragma once

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/SmallVector.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "common/op.h"

namespace batchops::python_entry {

inline bool is_plain_tensor(PyObject* o) { return THPVariable_CheckExact(o); }

// A Python int that fits int64_t (bool excluded: PyBool is not an exact int).
inline bool is_int(PyObject* o) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0;
}

// How one argument of C++ type T is taken from Python: `accepts` says whether it converts
// exactly; `convert` returns a value (or reference) the op's parameter binds to.
template <typename T>
struct Arg;

template <>
struct Arg<const at::Tensor&> {
  static bool accepts(PyObject* o) { return is_plain_tensor(o); }
  static const at::Tensor& convert(PyObject* o) { return THPVariable_Unpack(o); }
};

template <>
struct Arg<const std::optional<at::Tensor>&> {
  static bool accepts(PyObject* o) { return o == Py_None || is_plain_tensor(o); }
  static std::optional<at::Tensor> convert(PyObject* o) {
    if (o == Py_None) return std::nullopt;
    return THPVariable_Unpack(o);
  }
};

template <>
struct Arg<bool> {
  static bool accepts(PyObject* o) { return PyBool_Check(o); }
  static bool convert(PyObject* o) { return o == Py_True; }
};

template <>
struct Arg<double> {
  static bool accepts(PyObject* o) { return PyFloat_CheckExact(o) || is_int(o); }
  static double convert(PyObject* o) {
    return PyFloat_CheckExact(o) ? PyFloat_AS_DOUBLE(o) : static_cast<double>(PyLong_AsLongLong(o));
  }
};

template <>
struct Arg<std::optional<c10::string_view>> {
  static bool accepts(PyObject* o) { return o == Py_None || PyUnicode_CheckExact(o); }
  // The view points into the str object, which the caller's argument array keeps alive.
  static std::optional<c10::string_view> convert(PyObject* o) {
    if (o == Py_None) return std::nullopt;
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(o, &size);
    if (data == nullptr) throw python_error();
    return c10::string_view(data, static_cast<size_t>(size));
  }
};

// A list or tuple whose items each pass `item`.
template <typename Item>
bool is_sequence_of(PyObject* o, Item item, Py_ssize_t expected_size = -1) {
  if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) return false;
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(o);
  if (expected_size >= 0 && size != expected_size) return false;
  PyObject** items = PySequence_Fast_ITEMS(o);
  for (Py_ssize_t i = 0; i < size; ++i)
    if (!item(items[i])) return false;
  return true;
}

template <size_t N>
struct Arg<std::array<bool, N>> {
  static bool accepts(PyObject* o) {
    return is_sequence_of(o, [](PyObject* item) { return PyBool_Check(item); }, N);
  }
  static std::array<bool, N> convert(PyObject* o) {
    std::array<bool, N> out{};
    PyObject** items = PySequence_Fast_ITEMS(o);
    for (size_t i = 0; i < N; ++i) out[i] = items[i] == Py_True;
    return out;
  }
};

using IntList = c10::SmallVector<int64_t, 5>;

inline IntList int_list(PyObject* o) {
  IntList out;
  PyObject** items = PySequence_Fast_ITEMS(o);
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(o); ++i) out.push_back(PyLong_AsLongLong(items[i]));
  return out;
}

// int[] arguments: a list or tuple of ints (torch.ops also takes one int for int[2]; that goes there).
template <>
struct Arg<at::IntArrayRef> {
  static bool accepts(PyObject* o) { return is_sequence_of(o, is_int); }
  static IntList convert(PyObject* o) { return int_list(o); }
};

// The concrete sizes of a plain call (symbolic sizes come from tracing, which goes to torch.ops).
struct SymIntList {
  IntList values;
  operator c10::SymIntArrayRef() const { return c10::fromIntArrayRefSlow(values); }
};

template <>
struct Arg<c10::SymIntArrayRef> {
  static bool accepts(PyObject* o) { return is_sequence_of(o, is_int); }
  static SymIntList convert(PyObject* o) { return {int_list(o)}; }
};

template <>
struct Arg<const at::Scalar&> {
  static bool accepts(PyObject* o) { return PyBool_Check(o) || PyFloat_CheckExact(o) || is_int(o); }
  static at::Scalar convert(PyObject* o) {
    if (PyBool_Check(o)) return at::Scalar(o == Py_True);
    if (PyFloat_CheckExact(o)) return at::Scalar(PyFloat_AS_DOUBLE(o));
    return at::Scalar(static_cast<int64_t>(PyLong_AsLongLong(o)));
  }
};

// Results: a tensor, or a tuple of them.
inline PyObject* wrap(at::Tensor&& t) { return THPVariable_Wrap(std::move(t)); }

template <typename... Ts>
PyObject* wrap(std::tuple<Ts...>&& results) {
  PyObject* tuple = PyTuple_New(sizeof...(Ts));
  if (tuple == nullptr) throw python_error();
  std::apply(
      [&](auto&... t) {
        Py_ssize_t i = 0;
        (PyTuple_SET_ITEM(tuple, i++, THPVariable_Wrap(std::move(t))), ...);
      },
      results);
  return tuple;
}

template <typename Sig>
struct Call;

template <typename Ret, typename... Args>
struct Call<Ret(Args...)> {
  template <typename Op, size_t... I>
  static PyObject* run(PyObject* const* args, Py_ssize_t nargs, std::index_sequence<I...>) {
    if (nargs != static_cast<Py_ssize_t>(sizeof...(Args)) || at::impl::torch_function_mode_enabled() ||
        !(Arg<Args>::accepts(args[I]) && ...))
      Py_RETURN_NOTIMPLEMENTED;
    // Converted before the GIL is released (they read Python objects); references into the
    // argument array stay valid, the caller holds it.
    std::tuple<decltype(Arg<Args>::convert(args[I]))...> converted(Arg<Args>::convert(args[I])...);
    Ret results = [&] {
      pybind11::gil_scoped_release no_gil;  // as torch.ops does around the call
      return std::apply([](auto&... a) { return op_handle<Op>().call(a...); }, converted);
    }();
    return wrap(std::move(results));
  }
};

// The METH_FASTCALL function for Op: Op's results, or NotImplemented (see the top of this file).
template <typename Op>
PyObject* call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Sig = typename Op::Sig;
  constexpr size_t arity = c10::guts::infer_function_traits_t<Sig>::number_of_parameters;
  return Call<Sig>::template run<Op>(args, nargs, std::make_index_sequence<arity>{});
  END_HANDLE_TH_ERRORS
}

template <typename Op>
PyMethodDef method() {
  return {Op::name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&call<Op>)), METH_FASTCALL,
          "The op with plain tensors, without torch.ops' argument parsing; NotImplemented for any other "
          "arguments (batchops/ops/common.py: op_caller)."};
}

}  // namespace batchops::python_entry
