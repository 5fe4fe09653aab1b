// Every batchops op's schema, in one place. Device files only implement them
// (TORCH_LIBRARY_IMPL), each op's autograd.cpp its Autograd kernel; Python adds the fake
// kernels (batchops/ops/).
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_isa.h"

TORCH_LIBRARY(batchops, m) {
  // Batch norm. Functional: the new running statistics are returned (empty when not
  // updated) and copied into the buffers by the Python layer, so the op can carry autograd.
  // y = act(bn(x) + residual); save_mean / save_invstd are float (double for double input).
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor? running_mean, Tensor? running_var, bool training, float momentum, "
      "Tensor? momentum_tensor, float eps, str? activation) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor new_running_mean, Tensor new_running_var)");
  // output_mask: grad_input, grad_weight, grad_bias, grad_residual; unrequested ones are empty.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor save_mean, Tensor save_invstd, bool training, str? activation, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // For SyncBatchNorm. Per-channel mean and m2 (sum of squared deviations from the mean) of
  // the input, float (double for double input); both 0 for an empty batch. The count is
  // input.numel() / C.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  // grad_input = w * invstd * (g - mean_g - xhat * mean_gxhat) with g = dy * act'(pre),
  // xhat = (x - save_mean) * save_invstd, and mean_g / mean_gxhat given (per channel, over the
  // whole distributed batch); grad_residual = g. output_mask: grad_input, grad_residual.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor save_mean, Tensor save_invstd, Tensor mean_g, Tensor mean_gxhat, str? activation, "
      "bool[2] output_mask) -> (Tensor grad_input, Tensor grad_residual)");

  // Linear: output = act(input @ weight^T + bias). `saved` is what backward needs besides the
  // inputs: the activation's derivative at input @ weight^T + bias for silu / gelu / gelu_tanh
  // when save_for_backward, else empty (relu's backward reads the output; without autograd
  // nothing is needed). See csrc/linear/linear.h.
  m.def(
      "linear_forward(Tensor input, Tensor weight, Tensor? bias, str? activation, bool save_for_backward=True) "
      "-> (Tensor output, Tensor saved)");
  // output_mask: grad_input, grad_weight, grad_bias; unrequested ones are empty.
  m.def(
      "linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, Tensor output, "
      "Tensor saved, str? activation, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Grouped: weight (G, out, in), bias (G, out). Without group_sizes the input is
  // (G, ..., in); with them it is (total_rows, in), rows ordered by group, group_sizes (G)
  // integers on the CPU or the input's device. group_offsets: the groups' row offsets, int64
  // (G + 1) on the input's device; backward takes them (optional) instead of uploading host
  // sizes, or checking and summing device sizes, a second time.
  m.def(
      "grouped_linear_forward(Tensor input, Tensor weight, Tensor? bias, Tensor? group_sizes, str? activation, "
      "bool save_for_backward=True) -> (Tensor output, Tensor saved, Tensor group_offsets)");
  m.def(
      "grouped_linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? group_sizes, Tensor output, Tensor saved, str? activation, bool[3] output_mask, "
      "Tensor? group_offsets=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // Packing: out[i] = index[i] >= 0 ? input[index[i]] : fill, rows = input's first dimension.
  // inverse_index (input row -> output row or -1) is not read by the kernel: autograd uses it
  // to make the backward one more gather instead of a scatter-add.
  m.def("gather_rows(Tensor input, Tensor index, Tensor? inverse_index, Scalar fill) -> Tensor");
}

// A plain Python module (no pybind11: faster to compile). Importing it runs the
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

static PyMethodDef batchops_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use now: default, avx2 or avx512."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef batchops_module = {PyModuleDef_HEAD_INIT, "_C", "batchops compiled kernels", -1,
                                             batchops_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&batchops_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", BATCHOPS_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_archs", BATCHOPS_CUDA_ARCHS);
  PyModule_AddIntConstant(m, "with_cuda", BATCHOPS_WITH_CUDA);
  return m;
}
