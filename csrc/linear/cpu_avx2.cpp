// The CPU linear epilogues compiled for AVX2; cpu.cpp calls them when the processor has it.
// How, and why every header comes first: common/cpu_variant.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "linear/linear.h"

#define BATCHOPS_CPU_KERNELS_HEADER "linear/cpu_kernels.h"
#include "common/cpu_variant.h"
