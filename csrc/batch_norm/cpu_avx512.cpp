// The CPU batch norm kernels compiled for AVX512; cpu.cpp calls them when the processor has it.
// How, and why every header comes first: common/cpu_variant.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "batch_norm/batch_norm.h"

#define BATCHOPS_CPU_KERNELS_HEADER "batch_norm/cpu_kernels.h"
#define BATCHOPS_CPU_VARIANT_AVX512 1
#include "common/cpu_variant.h"
