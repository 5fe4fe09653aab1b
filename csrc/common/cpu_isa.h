// Which vector instruction set the CPU kernels run with. Each CPU kernel header is compiled
// once per level (default SSE2, AVX2+FMA, AVX-512) and the best level the processor supports
// is chosen at run time, as ATen's DispatchStub does. BATCHOPS_CPU_ISA=default|avx2|avx512
// caps the choice (tests use it to cover every level on one machine).
#pragma once

#include <c10/core/ScalarType.h>

namespace batchops {

enum class CpuIsa : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// Read on every call (a getenv, nanoseconds) so a test can switch levels in one process.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

// The level a kernel for `dtype` runs at: cpu_isa() for float32; the baseline for the other
// dtypes, which only the baseline build carries (common/cpu_dtypes.h).
inline CpuIsa cpu_isa_for(c10::ScalarType dtype) {
  const CpuIsa isa = cpu_isa();  // read (and BATCHOPS_CPU_ISA checked) for every dtype
  return dtype == c10::kFloat ? isa : CpuIsa::kDefault;
}

// The build of a CPU kernel that runs for `dtype`: one function compiled from a kernel header
// in the namespaces cpu_default, cpu_avx2 and cpu_avx512, passed as BATCHOPS_CPU_KERNELS(name).
// Every op's CPU entry points choose their kernels through this.
template <typename Fn>
Fn* cpu_kernel_for(c10::ScalarType dtype, Fn* fn_default, Fn* fn_avx2, Fn* fn_avx512) {
  switch (cpu_isa_for(dtype)) {
    case CpuIsa::kAVX512:
      return fn_avx512;
    case CpuIsa::kAVX2:
      return fn_avx2;
    default:
      return fn_default;
  }
}

}  // namespace batchops

// The variant files compile only with GCC on x86-64; elsewhere the default level is used.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BATCHOPS_CPU_VARIANTS 1
#define BATCHOPS_CPU_KERNELS(NAME) \
  &::batchops::cpu_default::NAME, &::batchops::cpu_avx2::NAME, &::batchops::cpu_avx512::NAME
#else
#define BATCHOPS_CPU_VARIANTS 0
#define BATCHOPS_CPU_KERNELS(NAME) \
  &::batchops::cpu_default::NAME, &::batchops::cpu_default::NAME, &::batchops::cpu_default::NAME
#endif
