#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

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
  const char* cap = std::getenv("BATCHOPS_CPU_ISA");
  if (cap != nullptr && cap[0] != '\0') {  // set and not empty
    CpuIsa wanted = isa;
    if (std::strcmp(cap, "default") == 0) {
      wanted = CpuIsa::kDefault;
    } else if (std::strcmp(cap, "avx2") == 0) {
      wanted = CpuIsa::kAVX2;
    } else if (std::strcmp(cap, "avx512") == 0) {
      wanted = CpuIsa::kAVX512;
    } else {  // a typo must not silently run another level than the one asked for
      TORCH_CHECK_VALUE(false, "BATCHOPS_CPU_ISA must be default, avx2 or avx512 (or unset), got '", cap, "'");
    }
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
