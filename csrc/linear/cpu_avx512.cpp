// The CPU linear epilogues compiled for AVX512; cpu.cpp calls them when the processor has it.
// Every header is included before the target pragma so that only the kernels in
// cpu_kernels.h get the wider instructions (see batch_norm/cpu_avx2.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "common/cpu_isa.h"
#include "linear/linear.h"

#if BATCHOPS_CPU_VARIANTS
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c")
#define BATCHOPS_CPU_NS cpu_avx512
#define BATCHOPS_CPU_FLOAT32_ONLY 1  // other dtypes run the baseline build (common/cpu_dtypes.h)
#define BATCHOPS_CPU_AVX512_INTRINSICS 1  // the float GELU epilogue in intrinsics
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_ps() and then warn
// about it when they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "linear/cpu_kernels.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
