// Which dtypes a CPU kernel header is compiled for. float32, the dtype CPU training runs in,
// is compiled at every instruction-set level; float64, float16 and bfloat16 (cold on the
// CPU) only in the baseline build, which cpu_isa_for() sends them to. A variant file
// (cpu_avx2.cpp, cpu_avx512.cpp) defines BATCHOPS_CPU_FLOAT32_ONLY (common/cpu_variant.h)
// before including a kernel header. Compiling every dtype three times was most of the build's
// time.
//
// No include guard on purpose: each kernel header includes this after its file chose.
#undef BATCHOPS_CPU_DISPATCH_DTYPES
#ifdef BATCHOPS_CPU_FLOAT32_ONLY
#define BATCHOPS_CPU_DISPATCH_DTYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__))
#else
#define BATCHOPS_CPU_DISPATCH_DTYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#endif
