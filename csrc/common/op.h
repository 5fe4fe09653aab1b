// How an op is said once (see csrc/ADDING_AN_OP.md).
//
// Each op has a descriptor in its folder's header: its name, its schema and its C++ signature,
// side by side:
//
//   struct GatherRowsOp {
//     static constexpr const char* name = "gather_rows";
//     static constexpr const char* schema = "gather_rows(Tensor input, ...) -> Tensor";
//     using Sig = at::Tensor(const at::Tensor& input, ...);
//   };
//
// The folder's schema.cpp defines it (define_op), every device registers the one entry point
// with that signature (impl_op: a kernel of any other type does not compile, and the
// dispatcher checks the kernel against the schema when the library loads), and autograd calls
// it through op_handle. Device files supply only kernels that run a plan; the entry points
// (check and plan, device guard, kernel, results) are written once per op for both devices.
// Descriptors, entry points and register_*_ops functions look alike across ops by design
// (the same few fields and steps with each op's own types); `duplicates` lists them as
// same-shape pairs.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace batchops {

// A device's guard for its entry points: the CPU needs none; CUDA uses c10::cuda::CUDAGuard.
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

// Defines the op's schema, with tags such as at::Tag::flexible_layout: inductor then hands the op
// its inputs in whatever layout it computed them in, instead of copying them to the strides they
// had in eager mode (for ops whose kernels take any strides and whose fake kernels say which
// layout the outputs get).
template <typename Op>
void define_op(torch::Library& m, const std::vector<at::Tag>& tags = {}) {
  m.def(Op::schema, tags);
}

// Registers `kernel` for the device (or dispatch key) of `m`'s TORCH_LIBRARY_IMPL block.
template <typename Op>
void impl_op(torch::Library& m, typename Op::Sig* kernel) {
  m.impl(Op::name, kernel);
}

// The op's typed dispatcher handle, looked up once.
template <typename Op>
const c10::TypedOperatorHandle<typename Op::Sig>& op_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow((std::string("batchops::") + Op::name).c_str(), "")
                                 .template typed<typename Op::Sig>();
  return handle;
}

}  // namespace batchops
