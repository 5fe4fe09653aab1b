// The CPU max pool forward compiled for AVX512; cpu.cpp calls them when the processor has it.
// How, and why every header comes first: common/cpu_variant.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "max_pool/max_pool.h"

#define BATCHOPS_CPU_KERNELS_HEADER "max_pool/cpu_kernels.h"
#define BATCHOPS_CPU_VARIANT_AVX512 1
#include "common/cpu_variant.h"
