// The CPU linear epilogues compiled for AVX512; cpu.cpp calls them when the processor has it.
// How, and why every header comes first: common/cpu_variant.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "common/cpu_isa.h"  // BATCHOPS_CPU_VARIANTS
#include "linear/linear.h"

#if BATCHOPS_CPU_VARIANTS
#include <immintrin.h>
#endif

#define BATCHOPS_CPU_KERNELS_HEADER "linear/cpu_kernels.h"
#define BATCHOPS_CPU_VARIANT_AVX512 1
#define BATCHOPS_CPU_AVX512_INTRINSICS 1  // the float GELU epilogue in intrinsics
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_ps() and then warn
// about it when they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common/cpu_variant.h"
#pragma GCC diagnostic pop
