// Compiles an op's CPU kernel header once more for a wider instruction set, in its own
// namespace (cpu_avx2 / cpu_avx512, common/cpu_isa.h picks one at run time). A variant file
// (csrc/<op>/cpu_avx2.cpp, cpu_avx512.cpp) includes every header its kernels use, then names the
// kernel header and the level and includes this:
//
//   #define BATCHOPS_CPU_KERNELS_HEADER "max_pool/cpu_kernels.h"
//   #define BATCHOPS_CPU_VARIANT_AVX512 1   // or leave it out for AVX2
//   #include "common/cpu_variant.h"
//
// Why the headers first: the target pragma applies to what is defined after it, so only the
// kernels (in their own namespace, internal linkage) get the wider instructions; inline
// functions and templates shared with other files stay baseline code
// (scripts/check_isa_leaks.py checks the built library). Other dtypes than float32 run the
// baseline build (common/cpu_dtypes.h). No include guard: a variant file includes it once.
#include "common/cpu_isa.h"

#if BATCHOPS_CPU_VARIANTS
#pragma GCC push_options
#if BATCHOPS_CPU_VARIANT_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c")
#define BATCHOPS_CPU_NS cpu_avx512
#define BATCHOPS_CPU_VECTOR_BYTES 64
#else
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define BATCHOPS_CPU_NS cpu_avx2
#define BATCHOPS_CPU_VECTOR_BYTES 32
#endif
#define BATCHOPS_CPU_FLOAT32_ONLY 1
#include BATCHOPS_CPU_KERNELS_HEADER
#pragma GCC pop_options
#endif
