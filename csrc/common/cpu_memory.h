// Fresh CPU outputs: on Linux, large allocations are new mmap'd pages, and on the VMs we
// measure on faulting them in at 4 KiB each costs more than writing them (a fresh 64 MiB
// output: ~16 ms of faults against ~1.5 ms of stores). Asking for transparent huge pages on
// the output before the kernel's first touch cuts the faults ~500x where THP is in "madvise"
// mode (torch does the same for its own allocations under THP_MEM_ALLOC_ENABLE=1).
#pragma once

#include <ATen/core/Tensor.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace batchops {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.defined() || !t.device().is_cpu()) return;
  const auto bytes = static_cast<uintptr_t>(t.nbytes());
  if (bytes < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
}

}  // namespace batchops
