// The CPU linear epilogues compiled for AVX2; cpu.cpp calls them when the processor has it.
// How, and why every header comes first: common/cpu_variant.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "common/cpu_isa.h"  // BATCHOPS_CPU_VARIANTS
#include "linear/linear.h"

#if BATCHOPS_CPU_VARIANTS
#include <immintrin.h>
#endif

#define BATCHOPS_CPU_KERNELS_HEADER "linear/cpu_kernels.h"
#define BATCHOPS_CPU_AVX2_INTRINSICS 1  // the float GELU epilogue in intrinsics
#include "common/cpu_variant.h"
