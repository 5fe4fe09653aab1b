// The CPU max pool forward compiled for AVX2; cpu.cpp calls it when the processor has it.
// Every header is included before the target pragma so that only the kernels in
// cpu_kernels.h get the wider instructions (see batch_norm/cpu_avx2.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/cpu_isa.h"
#include "max_pool/max_pool.h"

#if BATCHOPS_CPU_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define BATCHOPS_CPU_NS cpu_avx2
#define BATCHOPS_CPU_FLOAT32_ONLY 1  // other dtypes run the baseline build (common/cpu_dtypes.h)
#include "max_pool/cpu_kernels.h"
#pragma GCC pop_options
#endif
