// Fresh CPU outputs: on Linux, large allocations are new mmap'd pages, and on the VMs we
// measure on faulting them in at 4 KiB each costs more than writing them (a fresh 64 MiB
// output: ~16 ms of faults against ~1.5 ms of stores). Asking for transparent huge pages on
// the output before the kernel's first touch cuts the faults ~500x where THP is in "madvise"
// mode (torch does the same for its own allocations under THP_MEM_ALLOC_ENABLE=1).
// Only from 32 MiB, glibc's largest mmap threshold: below it glibc hands freed blocks out again
// from its heap (its threshold rises to the size of each mmap'd block freed), already faulted
// in, and there the madvise call itself cost 8-55 us a call (a 24.5 MiB output, AMD EPYC VM) for
// nothing: eval forward at 16x64x56x56 went from 0.84-1.01x torch's to 0.57-1.01 channels-last
// and 0.95-1.11 to 0.92-1.05 NCHW (A/B of builds, four alternations each) when outputs of 8 to 32
// MiB stopped being advised.
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
  if (bytes < 16 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
}

}  // namespace batchops
