#include "common/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace batchops {
namespace {

CpuIsa supported() {
#if BATCHOPS_CPU_VARIANTS
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::kAVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAVX2;
    return CpuIsa::kDefault;
  }();
  return best;
#else
  return CpuIsa::kDefault;
#endif
}

}  // namespace

CpuIsa cpu_isa() {
  CpuIsa isa = supported();
  if (const char* cap = std::getenv("BATCHOPS_CPU_ISA")) {
    CpuIsa wanted = isa;
    if (std::strcmp(cap, "default") == 0) wanted = CpuIsa::kDefault;
    if (std::strcmp(cap, "avx2") == 0) wanted = CpuIsa::kAVX2;
    if (static_cast<int>(wanted) < static_cast<int>(isa)) isa = wanted;
  }
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAVX512:
      return "avx512";
    case CpuIsa::kAVX2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace batchops
