// Row gather on the CPU: one memcpy per output row, rows split across threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "common/cpu_memory.h"
#include "packing/entry_points.h"
#include "packing/packing.h"

namespace batchops {
namespace {

void gather_rows_cpu(GatherRowsPlan& p) {
  advise_huge_pages(p.output);
  const auto* src = static_cast<const char*>(p.input.const_data_ptr());
  const auto* fill_row = static_cast<const char*>(p.fill_row.const_data_ptr());
  auto* dst = static_cast<char*>(p.output.mutable_data_ptr());
  const int64_t* idx = p.index.const_data_ptr<int64_t>();
  const int64_t row_bytes = p.row_bytes, in_rows = p.in_rows;
  // ~64 KiB of output per task so small rows do not drown in scheduling.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, p.out_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = idx[i];
      TORCH_CHECK_INDEX(r < in_rows && r >= -1, "batchops.gather_rows: index[", i, "] = ", r,
                        " is out of range for ", in_rows, " input rows (-1 means fill)");
      std::memcpy(dst + i * row_bytes, r >= 0 ? src + r * row_bytes : fill_row, row_bytes);
    }
  });
}

// The kernel for the shared entry point (entry_points.h).
struct CpuPacking {
  using Guard = NoDeviceGuard;
  static void gather_rows(GatherRowsPlan& p) { gather_rows_cpu(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CPU, m) { register_packing_ops<CpuPacking>(m); }

}  // namespace batchops
