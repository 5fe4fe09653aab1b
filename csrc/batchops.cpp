// The batchops library. Each op folder defines its own ops (its schema.cpp, with
// TORCH_LIBRARY_FRAGMENT; the schemas live in the folder's header with each op's C++
// signature), its devices implement them and its autograd.cpp adds the Autograd kernels
// (common/op.h; csrc/ADDING_AN_OP.md). Python adds the fake kernels (batchops/ops/).
#include <Python.h>
#include <torch/library.h>

#include "batch_norm/batch_norm.h"
#include "common/activation.h"
#include "common/cpu_isa.h"
#include "common/python_entry.h"
#include "linear/linear.h"
#include "max_pool/max_pool.h"
#include "packing/packing.h"

TORCH_LIBRARY(batchops, m) {}

// A plain Python module (the C API, not pybind11's module machinery). Importing it runs the
// registrations above; its attributes record how it was built, for batchops.build_info().
#ifndef BATCHOPS_TORCH_VERSION
#define BATCHOPS_TORCH_VERSION "unknown"
#endif
#ifndef BATCHOPS_CUDA_ARCHS
#define BATCHOPS_CUDA_ARCHS ""
#endif
#ifndef BATCHOPS_WITH_CUDA
#define BATCHOPS_WITH_CUDA 0
#endif

static PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(batchops::cpu_isa_name(batchops::cpu_isa()));
  } catch (const c10::ValueError& e) {  // a bad BATCHOPS_CPU_ISA: no exception may cross the C API
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// cpu_isa, and each op's entry for plain-tensor calls under the op's name (common/python_entry.h).
static PyMethodDef batchops_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use now: default, avx2 or avx512."},
    batchops::python_entry::method<batchops::BatchNormForwardOp>(),
    batchops::python_entry::method<batchops::BatchNormBackwardOp>(),
    batchops::python_entry::method<batchops::BatchNormStatsOp>(),
    batchops::python_entry::method<batchops::BatchNormBackwardElemtOp>(),
    batchops::python_entry::method<batchops::LinearForwardOp>(),
    batchops::python_entry::method<batchops::LinearBackwardOp>(),
    batchops::python_entry::method<batchops::GroupedLinearForwardOp>(),
    batchops::python_entry::method<batchops::GroupedLinearBackwardOp>(),
    batchops::python_entry::method<batchops::MaxPool2dOp>(),
    batchops::python_entry::method<batchops::MaxPool2dBackwardOp>(),
    batchops::python_entry::method<batchops::MaxPool2dBatchNormBackwardOp>(),
    batchops::python_entry::method<batchops::MaxPool2dByWeightSignOp>(),
    batchops::python_entry::method<batchops::GatherRowsOp>(),
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef batchops_module = {PyModuleDef_HEAD_INIT, "_C", "batchops compiled kernels", -1,
                                             batchops_methods};

// The names of the activations (common/activation.h) for which `keep` holds, as a tuple.
template <typename Keep>
static PyObject* activation_names(Keep keep) {
  PyObject* names = PyList_New(0);
  for (const batchops::ActivationName& a : batchops::kActivationNames) {
    if (!keep(a.kind)) continue;
    PyObject* name = PyUnicode_FromString(a.name);
    PyList_Append(names, name);
    Py_DECREF(name);
  }
  PyObject* tuple = PyList_AsTuple(names);
  Py_DECREF(names);
  return tuple;
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&batchops_module);
  if (m == nullptr) return nullptr;
  // Lists Python must agree with, read from here instead of copied (batchops/ops/).
  PyModule_AddObject(m, "activations", activation_names([](batchops::Activation) { return true; }));
  PyModule_AddObject(m, "linear_saves_derivative", activation_names(batchops::activation_saves_derivative));
  PyModule_AddStringConstant(m, "torch_version", BATCHOPS_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_archs", BATCHOPS_CUDA_ARCHS);
  PyModule_AddIntConstant(m, "with_cuda", BATCHOPS_WITH_CUDA);
  return m;
}
