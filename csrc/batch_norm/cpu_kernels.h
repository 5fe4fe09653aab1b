// Batch norm on the CPU.
//
// Work is cut into fixed parts (at most kPiece elements of one (n, c) run in the planar
// view, or a block of rows in the channels-last view) whose partial results are combined per
// channel in a fixed order, so results do not depend on the thread count. A planar part fits in
// L1/L2, so the shifted two-pass statistics inside it cost no extra memory traffic; row blocks
// (channels-last) use Welford's one-pass update instead (see rows_stats).
//
// Passes over the rows view walk memory front to back. Planar inputs walk channel by channel
// where a channel's values of a tensor fit in L2 (channel_walk_fits: at most 256 KiB, 32 channels
// or more; short runs are copied in blocks of channels first, channels_resident): a channel's
// statistics (or gradient sums) then its normalisation back to back, the second from L2, as
// torch's channel-parallel kernels do, so x (and dy) come from memory once. Elsewhere planar
// passes stream by parts, front to back. (An earlier channel-by-channel version had been slower
// in a training step on an AMD EPYC, 97 ms against 57 streaming in resnet50's step, waiting on
// memory latency; the walks of 2026-12-08 measured 25-40% faster than the parts from memory, past
// the last-level cache, on a Xeon, and are still to be measured on an AMD processor.)
// This header is compiled once per CPU instruction set (cpu.cpp, cpu_avx2.cpp, cpu_avx512.cpp),
// each time inside its own namespace BATCHOPS_CPU_NS; cpu.cpp picks one at run time.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "batch_norm/batch_norm.h"
#include "common/cpu_dtypes.h"  // BATCHOPS_CPU_DISPATCH_DTYPES for this build

#ifndef BATCHOPS_CPU_NS
#error "define BATCHOPS_CPU_NS before including batch_norm/cpu_kernels.h"
#endif

namespace batchops {
namespace BATCHOPS_CPU_NS {
namespace {

// A planar part holds at most kPiece values (16 KiB of float), so its two-pass statistics read it
// the second time from L1/L2; rows passes also take about kPiece values per task at least.
constexpr int64_t kPiece = 4096;
// Row blocks are larger: each ends in per-channel partial results that are combined per channel.
constexpr int64_t kRowBlock = 16384;
constexpr int64_t kMinBlockRows = 32;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Planar view (N, C, inner): parts of at most kPiece elements of one (n, c) run, each run cut
// into per_run parts (one unless inner > kPiece). Parts are computed in memory order; their
// results are stored by slot = n * per_run + k (k: the part within its run), [slot][c], and
// combined per channel in slot order.
struct PlanarParts {
  int64_t N, C, inner, per_run;
  explicit PlanarParts(const BatchNormLayout& l)
      : N(l.N), C(l.C), inner(l.inner), per_run(std::max<int64_t>(1, (l.inner + kPiece - 1) / kPiece)) {}
  int64_t slots() const { return N * per_run; }                          // parts per channel
  int64_t len(int64_t slot) const { return std::min(kPiece, inner - (slot % per_run) * kPiece); }
};

// fn(off, len, c, slot) for planar parts [begin, end), numbered in memory order (part
// (n * C + c) * per_run + k).
template <typename F>
inline void planar_parts_in(const PlanarParts& parts, int64_t begin, int64_t end, F&& fn) {
  const int64_t C = parts.C, inner = parts.inner, per_run = parts.per_run;
  int64_t nc = begin / per_run, k = begin % per_run;
  int64_t n = nc / C, c = nc % C;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t start = k * kPiece;
    fn(nc * inner + start, std::min(kPiece, inner - start), c, n * per_run + k);
    if (++k == per_run) {
      k = 0;
      ++nc;
      if (++c == C) {
        c = 0;
        ++n;
      }
    }
  }
}

// fn(parts, begin, end) for ranges of planar parts in parallel (at least about kPiece values per
// task), and fn(off, len, c, slot) for every part in memory order: the planar view's data passes.
template <typename F>
void for_planar_part_ranges(const BatchNormLayout& l, F&& fn) {
  const PlanarParts parts(l);
  const int64_t part_len = std::min(kPiece, std::max<int64_t>(l.inner, 1));
  at::parallel_for(0, l.N * l.C * parts.per_run, std::max<int64_t>(1, kPiece / part_len),
                   [&](int64_t begin, int64_t end) { fn(parts, begin, end); });
}

template <typename F>
void for_planar_parts(const BatchNormLayout& l, F&& fn) {
  for_planar_part_ranges(l, [&](const PlanarParts& parts, int64_t begin, int64_t end) {
    planar_parts_in(parts, begin, end, fn);
  });
}

// Planar view with short runs (inner <= kShortRun, per_channel <= kPiece: resnet50's 7x7 and 4x4
// layers at batch 16), training forward and batch_norm_stats: tasks take blocks of whole
// channels, copy a block's runs into a channel-major buffer (x[n, c0:c0+width, :] is contiguous
// for each n, so the copy streams), compute each channel's statistics there in one run and
// normalise from there. x is read from memory once instead of twice, and a channel costs one
// shifted two-pass reduction where the parts cost one per (n, c) run: at 16x2048x4x4 that was
// 32768 runs of 16 values, three horizontal sums each. Training forward with ReLU, AMD EPYC, 2
// threads, ratio to torch's batch norm + ReLU, cache-warm / inputs cycled through 8 sets with a
// residual: 16x2048x4x4 0.91 -> 0.34 / 0.88 -> 0.59, 16x1024x7x7 0.43 -> 0.23 / 0.52 -> 0.57.
// The backward stays on the tensors: the same scheme for it (dy, x and z gathered, sums and apply
// from the buffers) was slower than two streaming passes at 14x14, 7x7 and 4x4, cold or L3-warm
// (fused add + ReLU backward, L3-warm, 0.78 -> 1.12-1.22 of torch's time; resnet50's NCHW step
// 0.91 -> 0.97), though faster on cache-warm plain backwards; its sums pass takes a channel's
// runs in place, one after another (planar_channel_grad_sums), and without a residual the apply
// follows on the same runs while they are in cache (backward_apply_channel_runs; with one, a
// pass by parts). Without a residual, so do longer runs (sums_channel_by_channel).
// A channel's result depends on its own values in their order only: the same bits whatever the
// blocks or threads.
constexpr int64_t kResidentBlock = 16384;  // values per block and buffer (64 KiB of float)
constexpr int64_t kShortRun = 64;

inline bool channels_resident(const BatchNormLayout& l) {
  return !l.rows && l.inner <= kShortRun && l.per_channel() > 0 && l.per_channel() <= kPiece;
}

// Channel walks on longer runs, in place: a task takes a channel's runs one after another
// (statistics or gradient sums), then normalises them (the apply) while they are in L2, where
// one channel's values of a tensor take at most kChannelWalkBytes (at batch 16: every resnet50
// layer, 56x56's 196 KiB included): x (and dy) come from memory once instead of twice. Tasks
// take whole channels, so these walks want kWalkMinChannels at least: with fewer, parts keep
// every thread busy (a fixed bound: the pass never depends on the thread count).
constexpr int64_t kChannelWalkBytes = 256 * 1024;
constexpr int64_t kWalkMinChannels = 32;

inline bool channel_walk_fits(const BatchNormLayout& l, int64_t value_bytes) {
  return !l.rows && l.per_channel() > 0 && l.C >= kWalkMinChannels &&
         l.per_channel() * value_bytes <= kChannelWalkBytes;
}

// The training forward and batch_norm_stats walk channels where they are not resident (the
// statistics then the normalisation of each channel). Training forward with ReLU, Xeon with
// AVX-512, 2 threads, two alternations, us, parts -> walk, cache-warm / from memory (1.2 GiB of
// inputs cycled): 16x64x56x56 977-1348 -> 841-854 / 1760-2208 -> 1288-1352, 16x256x28x28
// 1048-1063 -> 862-911 / 1843-2151 -> 1267-1354, 16x512x14x14 706-777 -> 637-735 / 1215-1480 ->
// 862-959; with a residual from memory 16x256x28x28 2349-2711 -> 1877-2005.
inline bool forward_walks_channels(const BatchNormLayout& l, int64_t value_bytes) {
  return !channels_resident(l) && channel_walk_fits(l, value_bytes);
}

// fn(off, len) for channel c's runs (planar view) in memory order, each in pieces of at most
// kPiece values (the sums' L1 buffers hold one piece): the channel walks' one loop.
template <typename F>
inline void for_channel_pieces(const BatchNormLayout& l, int64_t c, F&& fn) {
  for (int64_t n = 0; n < l.N; ++n) {
    const int64_t run = (n * l.C + c) * l.inner;
    for (int64_t i = 0; i < l.inner; i += kPiece) fn(run + i, std::min(kPiece, l.inner - i));
  }
}

// A thread's scratch buffer of at least n values, kept from call to call: a std::vector per
// block is zero-filled on every call, and above 128 KiB glibc serves it from mmap, faulted in anew.
template <typename T>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Per-part results (row blocks' or planar parts' statistics and gradient sums) that every part
// writes before any is read. A std::vector zero-filled them, on the calling thread while the
// others waited: at 16x2048x4x4 channels-last (8 row blocks of 2048 channels, 256 KiB of doubles
// per call and direction) `perf` put 6% of a module's forward + backward in memset.
inline std::unique_ptr<double[]> part_results(int64_t n) { return std::unique_ptr<double[]>(new double[n]); }

// fn(c0, width) for blocks of whole channels [c0, c0 + width), in parallel.
template <typename F>
void for_channel_blocks(const BatchNormLayout& l, F&& fn) {
  const int64_t width = std::max<int64_t>(1, kResidentBlock / l.per_channel());
  at::parallel_for(0, (l.C + width - 1) / width, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) fn(blk * width, std::min(width, l.C - blk * width));
  });
}

// buf[(c - c0) * per_channel + n * inner + i] = src[(n * C + c) * inner + i] for channels
// [c0, c0 + width): each channel's values contiguous, in (n, i) order.
template <typename scalar_t>
void gather_channels(const scalar_t* src, const BatchNormLayout& l, int64_t c0, int64_t width, scalar_t* buf) {
  const int64_t inner = l.inner, pc = l.per_channel();
  for (int64_t n = 0; n < l.N; ++n) {
    const scalar_t* run = src + (n * l.C + c0) * inner;
    for (int64_t c = 0; c < width; ++c, run += inner) {
      scalar_t* dst = buf + c * pc + n * inner;
#pragma omp simd
      for (int64_t i = 0; i < inner; ++i) dst[i] = run[i];
    }
  }
}

// fn(buffer offset, tensor offset, c) for every (n, c) run of a block, in memory order.
template <typename F>
inline void for_block_runs(const BatchNormLayout& l, int64_t c0, int64_t width, F&& fn) {
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t c = c0; c < c0 + width; ++c) fn((c - c0) * l.per_channel() + n * l.inner, (n * l.C + c) * l.inner, c);
  }
}

// Rows view (M, C): blocks of about kRowBlock elements, and of at least kMinBlockRows rows:
// each block ends in per-channel partial results written out and combined per channel, which
// with 8-row blocks of 2048 channels (resnet50's 4x4 layers) cost more than the data passes.
struct RowBlocks {
  int64_t M, C, rows_per_block, count;
  explicit RowBlocks(const BatchNormLayout& l)
      : M(l.per_channel()),
        C(l.C),
        rows_per_block(std::max<int64_t>(kMinBlockRows, kRowBlock / std::max<int64_t>(l.C, 1))) {
    count = (M + rows_per_block - 1) / rows_per_block;
  }
  int64_t begin(int64_t b) const { return b * rows_per_block; }
  int64_t end(int64_t b) const { return std::min(M, (b + 1) * rows_per_block); }
};

// fn(c) for every channel, in parallel from 1024 channels up: the per-channel steps between the
// data passes (merging partial results, finalising, the constants of the next pass) ran on one
// thread while the others waited, a quarter of the time at 16x2048x4x4 (256 rows).
template <typename F>
void for_each_channel(int64_t C, F&& fn) {
  at::parallel_for(0, C, 512, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

// The rows view's loops take the channels in chunks of at most kColumnChunk, all rows of a
// range for one chunk before the next, so that a chunk's per-channel constants or accumulators
// (up to six arrays) stay in cache on very wide rows. Chunks of 512 kept 2048 channels' in L1 and
// helped on cache-resident data, but on data streamed from memory (a training step) reading each
// row in 2 KiB pieces, a block's rows twice, cost more: 16x1024x7x7 forward+backward with ReLU
// and a residual, inputs cycled through 96 MiB, 1.6-1.8 ms in chunks of 512, 1.2-1.3 whole.
// Every channel sees its rows in the same order whatever the chunks: the same bits.
constexpr int64_t kColumnChunk = 2048;

// Rows view (channels-last) loops run over channels innermost (contiguous, vectorised), as
// functions with their pointers by value: a loop written inside a lambda reads the captured
// pointers through the closure on every iteration and GCC does not vectorise it.
//
// The rows passes take kRowParts rows at once, one from each of kRowParts equal parts of their
// range of rows (rows r, r + part, r + 2 * part, ... for r in the first part): a channel's
// constants and running sums are loaded (and stored) once per kRowParts values instead of once
// per value, and the range is still read as kRowParts sequential streams. Row by row, the passes
// were bound by those loads and stores rather than by memory: the statistics, with inputs from
// memory, took up to twice torch.sum's time over the same data. Rows r and r + 1 taken together
// (one stream read out of order) lost on data from memory; standalone, 2 threads, AMD EPYC, GB/s
// of a block's Welford statistics, row by row / adjacent pairs / four parts / a plain sum:
// 256 channels, warm 39 / 60 / 82 / 137, from memory 23.2 / 14.4 / 25.3 / 27.1; 2048 channels,
// from memory 14.1 / 20.4 / 26.0 / 27.4. The ops against torch's, channels-last, A/B of
// alternating builds: forward, inputs from memory, 16x256x28x28 1.15-1.27 -> 0.90-0.99,
// 16x2048x4x4 1.11-1.17 -> 0.78-0.97; fused add + ReLU backward from memory at 16x1024x7x7
// 0.69-0.71 -> 0.54-0.56 ms; module forward + backward at 16x512x4x4 1.06-1.12 -> 0.97-0.98;
// 16x64x56x56 unchanged within the spread. Parts for the statistics and sums alone gained less.
constexpr int64_t kRowParts = 4;

// fn(std::integral_constant<int64_t, k>{}) for k = 0, ..., kCount - 1, written out: the rows
// functions' loop over their kRows rows inside the vectorised loop over channels. As a plain
// `for (k = 0; k < kRows; ++k)`, even with kRows = 1 or `#pragma GCC unroll`, GCC 12 left the
// channel loop scalar (2x the time of one row at a time).
template <typename F, int64_t... K>
inline void unrolled_over(F&& fn, std::integer_sequence<int64_t, K...>) {
  (fn(std::integral_constant<int64_t, K>{}), ...);
}
template <int64_t kCount, typename F>
inline void unrolled(F&& fn) {
  unrolled_over(fn, std::make_integer_sequence<int64_t, kCount>{});
}

// The rows passes' loops over channels [c0, c0 + width), vectorised to the last channel. GCC
// runs the tail of an `omp simd` loop (width not a multiple of the vector) as scalar code, which
// made the activations' selects branches, mispredicted about half the time on real data, and ran
// Welford's update one value at a time: channels-last at MobileNet's widths (24, 40, 72, 88, 120
// channels) the backward with ReLU took 3-6x its time without ReLU, the forward at 16x24x28x28
// twice that of 16x32x28x28. So each pass runs its whole vectors [c0, full_end), then the tail as
// one more full vector over the last kChannelVector channels, overlapping the vector before it
// (an elementwise pass writes the overlapped channels again, the same values: no output aliases
// an input; an accumulating pass is told which channels to take, `c >= full_end`, and leaves the
// others as they are), and only rows narrower than a vector one channel at a time
// [full_end, scalar_end). The three loops are written out in each pass around one function per
// channel (the rule above, pointers by value): a helper taking the body as a lambda, its closure
// by reference or by value, left some instantiations scalar (ReLU backward with a residual
// gradient 18x slower).
constexpr int64_t kChannelVector = 16;  // floats per AVX-512 vector (two AVX2, four SSE vectors)

struct ChannelVectors {
  int64_t full_end, last, scalar_end;
  bool overlap;
  ChannelVectors(int64_t c0, int64_t width)
      : full_end(c0 + width - width % kChannelVector),
        last(c0 + width - kChannelVector),
        scalar_end(width < kChannelVector ? c0 + width : full_end),
        overlap(width > kChannelVector && width % kChannelVector != 0) {}
};

// Every rows pass's walk over rows [begin, end) of C channels: for each column chunk [c0, c0 +
// width), fn(std::integral_constant<int64_t, kRows>{}, r, row_step, seen, c0, width) with kRows
// rows at once (r, r + row_step, ...), then the rows left one by one (kRows = 1); `seen` is how
// many of the range's rows earlier calls of the chunk took (for the statistics' counts).
template <typename F>
inline void for_row_parts(int64_t C, int64_t begin, int64_t end, F&& fn) {
  const int64_t part = (end - begin) / kRowParts;
  for (int64_t c0 = 0; c0 < C; c0 += kColumnChunk) {
    const int64_t width = std::min(kColumnChunk, C - c0);
    for (int64_t r = 0; r < part; ++r) {
      fn(std::integral_constant<int64_t, kRowParts>{}, begin + r, part, kRowParts * r, c0, width);
    }
    for (int64_t r = begin + kRowParts * part; r < end; ++r) {
      fn(std::integral_constant<int64_t, 1>{}, r, int64_t(0), r - begin, c0, width);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Statistics

// Count, mean and m2 from sums of d = x - shift over n values: sd = sum(d), sdd = sum(d^2).
template <typename acc>
WelfordData<double> shifted_stats(acc shift, acc sd, acc sdd, int64_t n) {
  WelfordData<double> w;
  w.count = n;
  w.mean = double(shift) + double(sd) / double(n);
  w.m2 = std::max(0.0, double(sdd) - double(sd) * double(sd) / double(n));
  return w;
}

// Sums over a span by lanes: lane j adds values j, j + kLanes, j + 2 * kLanes, ..., and the lanes
// are then added pairwise (lane_tree_sum), in an order fixed by this code. GCC ends an
// `omp simd reduction` by adding its vector's lanes one by one through the stack, a chain of 16
// dependent scalar adds per sum: for resnet50's 4x4 maps (runs of 16 values, one vector) that
// chain was most of the backward's sums pass (perf: 41% of the op's samples, 16 vmovss + vaddss
// per sum), and it cost the same per run at 7x7 and 14x14. Backward op alone against torch's,
// NCHW, 2 threads, AMD EPYC, cache-warm: 16x512x4x4 1.81-2.06 -> 1.42-1.60, 16x256x7x7 1.06-1.32
// -> 0.92-1.00, 16x512x14x14 0.63-0.67 -> 0.52-0.57; inputs from memory, 16x2048x4x4 0.74-0.81 ->
// 0.54-0.57; 28x28 and 56x56 unchanged within the spread.
constexpr int64_t kLanes = 16;

template <typename acc>
inline acc lane_tree_sum(acc* lanes) {
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// fn(i, count) over [0, n): count = kLanes values from i, then the count < kLanes left (maybe 0).
template <typename F>
inline void in_lane_chunks(int64_t n, F&& fn) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) fn(i, kLanes);
  fn(i, n - i);
}

// For j < count: x[j] added to lane j of s (sum_lanes); d = x[j] - shift to lane j of sd and d * d
// to lane j of sdd (shifted_sums_lanes).
template <typename scalar_t, typename acc>
inline void sum_lanes(const scalar_t* x, int64_t count, acc* s) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) s[j] += static_cast<acc>(x[j]);
}
template <typename scalar_t, typename acc>
inline void shifted_sums_lanes(const scalar_t* x, int64_t count, acc shift, acc* sd, acc* sdd) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const acc d = static_cast<acc>(x[j]) - shift;
    sd[j] += d;
    sdd[j] += d * d;
  }
}

// Shifted two-pass statistics of one L1-resident part: mean = shift + sum(d)/n and
// m2 = sum(d^2) - sum(d)^2/n with d = x - shift, accurate for large means (x = 1e4 + noise).
template <typename scalar_t>
WelfordData<double> run_stats(const scalar_t* x, int64_t n) {
  using acc = opmath_t<scalar_t>;
  acc s[kLanes] = {};
  in_lane_chunks(n, [&](int64_t i, int64_t count) { sum_lanes(x + i, count, s); });
  const acc shift = lane_tree_sum(s) / acc(n);
  acc sd[kLanes] = {}, sdd[kLanes] = {};
  in_lane_chunks(n, [&](int64_t i, int64_t count) { shifted_sums_lanes(x + i, count, shift, sd, sdd); });
  return shifted_stats(shift, lane_tree_sum(sd), lane_tree_sum(sdd), n);
}

// One value v into a running mean m and m2 q that will then have seen n values (inv_count = 1 / n):
// the step the rows view's statistics take per value in registers (rows_welford_tile), and
// rows_welford_rows's for one row at a time.
template <typename acc>
inline void welford_add(acc v, acc inv_count, acc& m, acc& q) {
  const acc d = v - m;
  const acc new_mean = m + d * inv_count;
  q += d * (v - new_mean);
  m = new_mean;
}

// Welford's update of the rows view for channel c (when `take`), on d = x - shift, kRows rows at once: row
// r (where x points) and the rows row_step, 2 * row_step, ... rows below it (for_row_parts), their
// values merged as one batch into each channel's running values, with inv_count = 1 / (the count
// after them). After each step every channel has seen the same count, so inv_count is one scalar
// and the update vectorises across channels. Each step loads and stores a channel's mean and m2
// once for kRows values: see for_row_parts.
template <int64_t kRows, typename scalar_t>
inline void rows_welford_channel(const scalar_t* x, int64_t row_step, int64_t C, int64_t c,
                                 opmath_t<scalar_t> inv_count, const opmath_t<scalar_t>* shift,
                                 opmath_t<scalar_t>* mean, opmath_t<scalar_t>* m2, bool take) {
  using acc = opmath_t<scalar_t>;
  // Both running values are loaded before either is stored. Written as `mean[c] += ...; m2[c] +=
  // ... mean[c]`, m2[c] was loaded after mean[c] was stored (the compiler cannot tell the arrays
  // apart), and with C = 1024 (or 2048) floats the two arrays lie 4 KiB apart: a load whose
  // address agrees with an earlier store's in the low 12 bits can wait on that store (4K
  // aliasing). Whether it did varied from process to process: the channels-last training forward
  // at 16x1024x7x7 took 0.13-0.15 ms in some processes and 0.2-0.43 in others (torch's 0.18-0.21);
  // now 0.13-0.17 in ten processes out of ten. The same for the backward's gradient sums.
  const acc m = mean[c], q0 = m2[c];
  acc q = q0, v[kRows], d[kRows], sum_d = 0;
  unrolled<kRows>([&](auto k) {
    v[k] = static_cast<acc>(x[k * row_step * C + c]) - shift[c];
    d[k] = v[k] - m;
    sum_d += d[k];
  });
  // Chan's merge of the batch written as Welford's step (welford_add for kRows = 1): the
  // sum of d_k (v_k - new_mean) is the batch's m2 plus the correction for its mean.
  const acc new_mean = m + sum_d * inv_count;
  unrolled<kRows>([&](auto k) { q += d[k] * (v[k] - new_mean); });
  mean[c] = take ? new_mean : m;
  m2[c] = take ? q : q0;
}

// The same for channels [c0, c0 + width) (ChannelVectors).
template <int64_t kRows, typename scalar_t>
inline void rows_welford_rows(const scalar_t* x, int64_t row_step, int64_t C, int64_t c0, int64_t width,
                              opmath_t<scalar_t> inv_count, const opmath_t<scalar_t>* shift, opmath_t<scalar_t>* mean,
                              opmath_t<scalar_t>* m2) {
  const ChannelVectors v(c0, width);
#pragma omp simd
  for (int64_t c = c0; c < v.full_end; ++c) {
    rows_welford_channel<kRows>(x, row_step, C, c, inv_count, shift, mean, m2, true);
  }
  if (v.overlap) {
#pragma omp simd
    for (int64_t k = 0; k < kChannelVector; ++k) {
      rows_welford_channel<kRows>(x, row_step, C, v.last + k, inv_count, shift, mean, m2, v.last + k >= v.full_end);
    }
  }
  for (int64_t c = v.full_end; c < v.scalar_end; ++c) {
    rows_welford_channel<kRows>(x, row_step, C, c, inv_count, shift, mean, m2, true);
  }
}

// Rows that are one tile of channels (C == kTile: the walk down the rows is contiguous) keep
// their per-channel running values in registers (rows_welford_tile, grad_sums_tile). Tiles are
// 256 or 512 bytes of the accumulation type (64 or 128 floats: four or eight AVX-512 vectors per
// array). fn(std::integral_constant<int64_t, kTile>{}) when C is a tile width up to kWidest x 256
// bytes, and true; else false. The statistics take 256-byte tiles only: at 128 floats (three
// arrays of eight vectors) the pass was slower than row by row (16x128x14x14, cold: 1.36-1.38x
// torch.sum's time -> 1.72-1.78), where the gradient sums gained (forward + backward 0.98-1.01 ->
// 0.89-0.92).
template <typename scalar_t, int64_t kWidest, typename F>
inline bool with_row_tile(int64_t C, F&& fn) {
  constexpr int64_t kSmall = 256 / sizeof(opmath_t<scalar_t>);
  if (C == kSmall) {
    fn(std::integral_constant<int64_t, kSmall>{});
    return true;
  }
  if (kWidest >= 2 && C == 2 * kSmall) {
    fn(std::integral_constant<int64_t, 2 * kSmall>{});
    return true;
  }
  return false;
}

// Whether this build's vector registers hold the statistics tile's running values (shift, mean
// and m2 of 64 floats: 12 of AVX-512's 32 registers, 24 of AVX2's 16). Where they do not, the
// updated mean and m2 spill, every row's update then waits on a store and a reload, and the tile
// lost to row by row: AVX2 build on an AMD EPYC without AVX-512 (family 25), channels-last
// BatchNorm2d forward + backward against torch's, 2 threads, two alternations: 16x64x56x56
// 1.06-1.09 tiled, 0.82-0.83 row by row; 16x64x28x28 1.00-1.02 and 0.70-0.78. Tiles of 32 or 16
// channels walked down the rows one after another were worse still (1.13-1.47).
// The gradient sums' widest tile (kGradSumsWidestTile, in units of 64 floats): at 64 channels the
// tile measured the same as row by row and as 32-channel tiles on AVX2 (0.72-0.89 each, within
// the noise), so every build keeps it; at 128 (mean and two sums: 24 of AVX-512's registers, 48
// of AVX2's) the AVX2 build lost to row by row: the backward op against torch's, channels-last,
// 2 threads, three alternating processes per choice: 16x128x28x28 0.88-0.93 tiled, 0.73-0.84 row
// by row; 16x128x40x40 0.92-1.05 and 0.80-0.92 (16x128x14x14 the same either way).
#if BATCHOPS_CPU_VARIANT_AVX512
constexpr bool kStatisticsTileInRegisters = true;
constexpr int64_t kGradSumsWidestTile = 2;
#else
constexpr bool kStatisticsTileInRegisters = false;
constexpr int64_t kGradSumsWidestTile = 1;
#endif

// Welford's update over rows [0, rows) of one-tile rows, the running values in local arrays of a
// size known at compile time, which the compiler keeps in registers for the whole walk: the
// step of rows_welford_rows (welford_add) without a load and a store of mean and m2 per value.
template <int64_t kTile, typename scalar_t>
inline void rows_welford_tile(const scalar_t* x, int64_t rows, opmath_t<scalar_t>* shift_out,
                              opmath_t<scalar_t>* mean_out, opmath_t<scalar_t>* m2_out) {
  using acc = opmath_t<scalar_t>;
  acc shift[kTile], mean[kTile], m2[kTile];
#pragma omp simd
  for (int64_t j = 0; j < kTile; ++j) {
    shift[j] = static_cast<acc>(x[j]);
    mean[j] = acc(0);
    m2[j] = acc(0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * kTile;
    const acc inv_count = acc(1) / acc(r + 1);
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) welford_add(static_cast<acc>(row[j]) - shift[j], inv_count, mean[j], m2[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < kTile; ++j) {
    shift_out[j] = shift[j];
    mean_out[j] = mean[j];
    m2_out[j] = m2[j];
  }
}

// The same per channel for a block of rows: mean[c] and m2[c] of channel c over the block, in
// one pass: Welford's update of x minus the block's first row. The shift keeps the float mean
// small (at x = 1e4 + noise the unshifted float mean drifted by 5e-3 over 1600 rows); Welford
// needs no second pass around the shift. The shifted two-pass form read the block twice, once
// from memory and once from L2, and streamed at half the rate of torch.sum. Row by row, every
// value costs a load and a store of its channel's mean and m2 besides its own load: on inputs
// streamed from memory the pass takes 1.1-2.3x the time of torch.sum over the same data
// (scripts/cold_batch_norm.py). Where a row is one tile of channels (64 floats: resnets' first
// stage) and the registers hold it (AVX-512: kStatisticsTileInRegisters), the tile goes down the
// rows with its running values in registers (rows_welford_tile): 16x64x56x56, 1.17-1.66x
// torch.sum's time -> 0.98-1.02. Wider rows walked tile by tile read
// each row in 256-byte pieces a row apart, which streamed worse than row by row (16x1024x7x7
// 1.56 -> 1.98x torch.sum, 16x256x28x28 1.41 -> 1.89; prefetching the next block into L2 did not
// help), so they stay row by row.
template <typename scalar_t>
void rows_stats(const scalar_t* x, int64_t rows, int64_t C, std::vector<opmath_t<scalar_t>>& scratch, double* mean,
                double* m2) {
  using acc = opmath_t<scalar_t>;
  scratch.assign(3 * C, acc(0));
  acc* shift = scratch.data();
  acc* mu = shift + C;
  acc* q = mu + C;
  const bool tiled = kStatisticsTileInRegisters && with_row_tile<scalar_t, 1>(C, [&](auto tile) {
    rows_welford_tile<decltype(tile)::value>(x, rows, shift, mu, q);
  });
  if (!tiled) {
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc>(x[c]);
    for_row_parts(C, 0, rows, [&](auto rows_at_once, int64_t r, int64_t row_step, int64_t seen, int64_t c0,
                                  int64_t width) {
      constexpr int64_t kRows = decltype(rows_at_once)::value;
      rows_welford_rows<kRows>(x + r * C, row_step, C, c0, width, acc(1) / acc(seen + kRows), shift, mu, q);
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = double(shift[c]) + double(mu[c]);
    m2[c] = std::max(0.0, double(q[c]));
  }
}

// Per-channel statistics from parts (row blocks, or planar parts by slot) given as mean[p][c] and
// m2[p][c], given to on_channel(c, stats), combined per channel in part order without a Chan
// merge (a division) per part and channel: mean = sum_p n_p mean_p / total, m2 = sum_p (m2_p +
// n_p (mean_p - mean)^2), in double, channels innermost (contiguous, vectorised). With 512
// channels in 98 row blocks (resnet50's 14x14 layers) the chained merges took longer than the
// data passes.
template <typename Count, typename F>
void combine_part_stats(int64_t parts, Count count_of, int64_t total, int64_t C, const double* part_mean,
                        const double* part_m2, F&& on_channel) {
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<double> mean(width, 0.0), m2(width, 0.0);
    for (int64_t p = 0; p < parts; ++p) {
      const double n_p = double(count_of(p));
      const double* pm = part_mean + p * C + begin;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) mean[j] += n_p * pm[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) mean[j] /= double(total);
    for (int64_t p = 0; p < parts; ++p) {
      const double n_p = double(count_of(p));
      const double* pm = part_mean + p * C + begin;
      const double* pv = part_m2 + p * C + begin;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const double d = pm[j] - mean[j];
        m2[j] += pv[j] + n_p * d * d;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      WelfordData<double> stats;
      stats.count = total;
      stats.mean = mean[j];
      stats.m2 = m2[j];
      on_channel(begin + j, stats);
    }
  });
}

// Gathers channels [c0, c0 + width) into buf (gather_channels) and gives each channel's
// statistics, on_channel(c, stats): the one place they are computed for the short-run path, so
// the training forward normalises with what batch_norm_stats returns, bit for bit.
template <typename scalar_t, typename F>
void gathered_channel_stats(const scalar_t* x, const BatchNormLayout& l, int64_t c0, int64_t width, scalar_t* buf,
                            F&& on_channel) {
  gather_channels(x, l, c0, width, buf);
  for (int64_t c = 0; c < width; ++c) on_channel(c0 + c, run_stats(buf + c * l.per_channel(), l.per_channel()));
}

// Channel c's statistics from its runs in place (planar view): each run (in pieces of at most
// kPiece values) by run_stats, merged in memory order (forward_walks_channels).
template <typename scalar_t>
WelfordData<double> planar_channel_stats(const scalar_t* x, const BatchNormLayout& l, int64_t c) {
  WelfordData<double> stats;
  for_channel_pieces(l, c, [&](int64_t off, int64_t len) { stats = welford_merge(stats, run_stats(x + off, len)); });
  return stats;
}

// Every channel's statistics, given to on_channel(c, stats) in parallel (the caller's per-channel
// work rides in the same parallel region): planar parts or row blocks in parallel, then combined
// per channel in order.
template <typename scalar_t, typename F>
void all_channel_stats(const scalar_t* x, const BatchNormLayout& l, F&& on_channel) {
  const int64_t C = l.C;
  if (channels_resident(l)) {
    for_channel_blocks(l, [&](int64_t c0, int64_t width) {
      gathered_channel_stats(x, l, c0, width, thread_scratch<scalar_t>(width * l.per_channel()), on_channel);
    });
  } else if (forward_walks_channels(l, sizeof(scalar_t))) {
    for_channel_blocks(l, [&](int64_t c0, int64_t width) {
      for (int64_t c = c0; c < c0 + width; ++c) on_channel(c, planar_channel_stats(x, l, c));
    });
  } else if (!l.rows) {
    const PlanarParts parts(l);
    auto part_mean = part_results(parts.slots() * C), part_m2 = part_results(parts.slots() * C);  // [slot][c]
    for_planar_parts(l, [&](int64_t off, int64_t len, int64_t c, int64_t slot) {
      const auto w = run_stats(x + off, len);
      part_mean[slot * C + c] = w.mean;
      part_m2[slot * C + c] = w.m2;
    });
    combine_part_stats(
        parts.slots(), [&](int64_t slot) { return parts.len(slot); }, l.per_channel(), C, part_mean.get(),
        part_m2.get(), on_channel);
  } else {
    RowBlocks blocks(l);
    auto block_mean = part_results(blocks.count * C), block_m2 = part_results(blocks.count * C);  // [b][c]
    at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t<scalar_t>> scratch;
      for (int64_t b = begin; b < end; ++b) {
        rows_stats(x + blocks.begin(b) * C, blocks.end(b) - blocks.begin(b), C, scratch, block_mean.get() + b * C,
                   block_m2.get() + b * C);
      }
    });
    combine_part_stats(
        blocks.count, [&](int64_t b) { return blocks.end(b) - blocks.begin(b); }, blocks.M, C, block_mean.get(),
        block_m2.get(), on_channel);
  }
}

// ---------------------------------------------------------------------------------------
// Elementwise passes. Channel constants come by value so they live in registers (through
// references the compiler must assume the output may alias them and reloads each element).

template <typename acc>
struct Affine {  // y = act((x - mean) * scale + shift [+ z])
  acc mean, scale, shift;
};

template <typename acc, typename stat_t>
Affine<acc> affine_of(int64_t c, const stat_t* mean, const stat_t* invstd, const stat_t* weight,
                      const stat_t* bias) {
  return {acc(mean[c]), acc(invstd[c] * (weight ? weight[c] : stat_t(1))), acc(bias ? bias[c] : stat_t(0))};
}

// The rows view keeps the per-channel constants as separate arrays, one vector load each in
// the loops over channels: an array of Affine structs made GCC de-interleave it with permutes.
template <typename acc>
struct AffineColumns {
  std::vector<acc> mean, scale, shift;
  explicit AffineColumns(int64_t C) : mean(C), scale(C), shift(C) {}
  void set(int64_t c, Affine<acc> a) {
    mean[c] = a.mean;
    scale[c] = a.scale;
    shift[c] = a.shift;
  }
};

template <typename acc>
struct CoeffColumns {
  std::vector<acc> mean_g, proj, scale;
  explicit CoeffColumns(int64_t C) : mean_g(C), proj(C), scale(C) {}
  void set(int64_t c, BackwardCoeffs<acc> k) {
    mean_g[c] = k.mean_g;
    proj[c] = k.proj;
    scale[c] = k.scale;
  }
};

template <typename scalar_t, Activation A, bool kResidual>
inline void forward_element(const scalar_t* x, const scalar_t* z, scalar_t* y, int64_t i,
                            Affine<opmath_t<scalar_t>> a) {
  using acc = opmath_t<scalar_t>;
  acc v = (static_cast<acc>(x[i]) - a.mean) * a.scale + a.shift;
  if constexpr (kResidual) v += static_cast<acc>(z[i]);
  y[i] = static_cast<scalar_t>(activation_forward<A>(v));
}

template <typename scalar_t, Activation A, bool kResidual>
inline void forward_span(const scalar_t* x, const scalar_t* z, scalar_t* y, int64_t off, int64_t len,
                         Affine<opmath_t<scalar_t>> a) {
#pragma omp simd
  for (int64_t i = off; i < off + len; ++i) forward_element<scalar_t, A, kResidual>(x, z, y, i, a);
}

// Channel c of rows r, r + row_step, ... (kRows rows: for_row_parts) of the rows view.
template <int64_t kRows, typename scalar_t, Activation A, bool kResidual>
inline void forward_channel(const scalar_t* x, const scalar_t* z, scalar_t* y, int64_t r, int64_t row_step, int64_t C,
                            int64_t c, const opmath_t<scalar_t>* mean, const opmath_t<scalar_t>* scale,
                            const opmath_t<scalar_t>* shift) {
  const Affine<opmath_t<scalar_t>> a{mean[c], scale[c], shift[c]};
  unrolled<kRows>([&](auto k) { forward_element<scalar_t, A, kResidual>(x, z, y, (r + k * row_step) * C + c, a); });
}

// The same for channels [c0, c0 + width) (ChannelVectors).
template <int64_t kRows, typename scalar_t, Activation A, bool kResidual>
inline void forward_rows(const scalar_t* x, const scalar_t* z, scalar_t* y, int64_t r, int64_t row_step, int64_t C,
                         int64_t c0, int64_t width, const opmath_t<scalar_t>* mean, const opmath_t<scalar_t>* scale,
                         const opmath_t<scalar_t>* shift) {
  const ChannelVectors v(c0, width);
#pragma omp simd
  for (int64_t c = c0; c < v.full_end; ++c) {
    forward_channel<kRows, scalar_t, A, kResidual>(x, z, y, r, row_step, C, c, mean, scale, shift);
  }
  if (v.overlap) {
#pragma omp simd
    for (int64_t k = 0; k < kChannelVector; ++k) {
      forward_channel<kRows, scalar_t, A, kResidual>(x, z, y, r, row_step, C, v.last + k, mean, scale, shift);
    }
  }
  for (int64_t c = v.full_end; c < v.scalar_end; ++c) {
    forward_channel<kRows, scalar_t, A, kResidual>(x, z, y, r, row_step, C, c, mean, scale, shift);
  }
}

// ---------------------------------------------------------------------------------------
// Eval forward: y = act(x * alpha + beta [+ z]) with alpha = invstd * weight and beta = bias -
// running_mean * alpha, per channel, as torch's eval kernel computes it (the training forward
// keeps (x - mean) * scale + shift, whose mean it has just computed). Two constants per channel
// instead of three: on the rows view (channels-last) the third column was a third load per value.
// The rows are taken one at a time, in memory order: the training passes' four rows at once
// (for_row_parts) pay off where a channel's running sums are loaded and stored, not here. A
// standalone loop of each, 2 threads, AMD EPYC, cache-warm: 256 rows x 2048 channels 54-58 us
// (three columns, four rows) -> 31-32 (two columns, one row); 12544 x 64 54-56 -> 41; 3136 x 256
// 57 -> 42; three columns one row at a time was the slowest (61 us at 256 x 2048). But a row at a
// time is one stream per thread, and on data that comes from memory that waits on latency: the
// op alone in a loop over the same 12.8 MB input (16x256x28x28, 16x64x56x56, mostly in the
// last-level cache) was as fast one row or four rows at a time, but alternating with torch's
// call (which evicts it; the benchmark's rows) a row at a time took 1.21-1.39x torch's time at
// 16x256x28x28 against 0.68-1.08 four at a time (five processes each), while at 6.4 MB
// (16x512x14x14, 16x128x28x28) a row at a time was as fast or faster. So inputs from
// kEvalRowPartsFrom values up (2 Mi: 8 MiB of float, a quarter of this machine's L3, where input
// and output no longer stay in it beside the layers around them) keep the training forward's
// rows pass, with a column of zeros for the mean: (x - 0) * alpha + beta, the same values. A
// two-column version of that pass measured slower in one set of runs (16x64x56x56 alone in a
// loop, medians 750-760 us against 390-590) and the unchanged pass as slow in the next: this
// host's drift from minute to minute was larger than any difference, so the pass is kept as
// it was.
constexpr int64_t kEvalRowPartsFrom = int64_t(1) << 21;

template <typename acc, typename stat_t>
void eval_constants(int64_t C, double eps, const stat_t* rm, const stat_t* rv, const stat_t* w, const stat_t* b,
                    stat_t* save_mean, stat_t* save_invstd, acc* alpha, acc* beta) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const stat_t invstd = stat_t(1) / std::sqrt(rv[c] + stat_t(eps));
    const acc a = acc(invstd * (w ? w[c] : stat_t(1)));
    save_mean[c] = rm[c];  // saved for a backward in eval mode, as torch's op returns them
    save_invstd[c] = invstd;
    alpha[c] = a;
    beta[c] = acc(b ? b[c] : stat_t(0)) - acc(rm[c]) * a;
  }
}

template <typename scalar_t, Activation A, bool kResidual>
inline void eval_element(const scalar_t* x, const scalar_t* z, scalar_t* y, int64_t i, opmath_t<scalar_t> alpha,
                         opmath_t<scalar_t> beta) {
  using acc = opmath_t<scalar_t>;
  acc v = static_cast<acc>(x[i]) * alpha + beta;
  if constexpr (kResidual) v += static_cast<acc>(z[i]);
  y[i] = static_cast<scalar_t>(activation_forward<A>(v));
}

// One span of len values, value i with constants alpha[i], beta[i]: a row of the rows view, or a
// sample's part of a channel chunk (eval_forward_channel_chunks). Vectorised to the end as the
// rows passes are (ChannelVectors).
template <typename scalar_t, Activation A, bool kResidual>
inline void eval_span(const scalar_t* x, const scalar_t* z, scalar_t* y, int64_t len,
                      const opmath_t<scalar_t>* alpha, const opmath_t<scalar_t>* beta) {
  const ChannelVectors v(0, len);
#pragma omp simd
  for (int64_t i = 0; i < v.full_end; ++i) eval_element<scalar_t, A, kResidual>(x, z, y, i, alpha[i], beta[i]);
  if (v.overlap) {
#pragma omp simd
    for (int64_t k = 0; k < kChannelVector; ++k) {
      const int64_t i = v.last + k;
      eval_element<scalar_t, A, kResidual>(x, z, y, i, alpha[i], beta[i]);
    }
  }
  for (int64_t i = v.full_end; i < v.scalar_end; ++i) {
    eval_element<scalar_t, A, kResidual>(x, z, y, i, alpha[i], beta[i]);
  }
}

// The eval forward on planar runs of whole vectors, at most kEvalWholeVectorRuns values (inner 16,
// 32, 48 or 64: resnet50's 4x4 maps, 8x8): run by run, the channel's constants hoisted and a
// fixed-width vector loop per vector, with neither forward_span's per-run set-up nor the channel
// chunks' constants written out (below). Every value goes through the one loop, whatever the
// batch. Op alone, Xeon with AVX-512, 2 threads, against a plain a * x + b loop over the same
// tensor: 16x512x4x4 7.2 us (the chunks 11, the loop 8.3), 16x2048x4x4 36.5 (43, 38).
constexpr int64_t kEvalWholeVectorRuns = 64;

// The channel of the run after channel c's (runs go c = 0 .. C - 1, then the next sample's).
inline int64_t next_channel(int64_t c, int64_t C) { return c + 1 == C ? 0 : c + 1; }

inline bool eval_by_whole_vector_runs(const BatchNormLayout& l) {
  return !l.rows && l.inner % kChannelVector == 0 && l.inner <= kEvalWholeVectorRuns;
}

template <typename scalar_t, Activation A, bool kResidual>
void eval_forward_whole_vector_runs(const scalar_t* x, const scalar_t* z, scalar_t* y, const BatchNormLayout& l,
                                    const opmath_t<scalar_t>* alpha, const opmath_t<scalar_t>* beta) {
  using acc = opmath_t<scalar_t>;
  const int64_t C = l.C, inner = l.inner;
  at::parallel_for(0, l.N * C, kPiece / inner, [&](int64_t begin, int64_t end) {
    int64_t c = begin % C;
    for (int64_t run = begin; run < end; ++run) {
      const acc a = alpha[c], b = beta[c];
      for (int64_t i0 = run * inner; i0 < (run + 1) * inner; i0 += kChannelVector) {
#pragma omp simd
        for (int64_t k = 0; k < kChannelVector; ++k) eval_element<scalar_t, A, kResidual>(x, z, y, i0 + k, a, b);
      }
      c = next_channel(c, C);
    }
  });
}

// The eval forward on planar runs shorter than a vector (inner < 16: 1x1 to 3x3 maps; 4x4 maps
// were here until 2026-12-08) with a batch of 4 or more. Run by run (forward_span), a
// run of 16 values cost as much loop set-up as arithmetic: the op took as long as torch's and
// 2.5x a plain x * 2 over the same tensor. Here a task takes a chunk of channels, writes their
// constants out repeated inner times (kEvalChunk values: two arrays of 1 KiB), then goes through
// the chunk's span of every sample, C * inner values apart, in one vectorised loop (eval_span).
// The same arithmetic per value as run by run. Op alone, AMD EPYC, 2 threads, ratio to torch's
// eval batch norm, five processes (three constants then): 16x512x4x4 1.02-1.12 -> 0.72-0.95,
// 16x2048x4x4 0.83-1.03 -> 0.68-0.77. Chunks of 512-2048 values did less well (2048: 24 KiB of
// constants, L1 is 32 KiB), and at 7x7 (runs of 49 values: three vectors and a remainder) run by
// run stayed ahead (0.62-0.71 against 0.65-0.85), so the chunks end at 16. Constants repeated
// across the whole row (arrays of C * inner) were read back from L2/L3 for every sample: slower
// than run by run.
constexpr int64_t kEvalChunk = 256;

// For a non-empty input (forward_cpu_typed returns before for an empty one).
inline bool eval_by_channel_chunks(const BatchNormLayout& l) {
  return !l.rows && l.inner < kChannelVector && l.N >= 4;
}

template <typename scalar_t, Activation A, bool kResidual>
void eval_forward_channel_chunks(const scalar_t* x, const scalar_t* z, scalar_t* y, const BatchNormLayout& l,
                                 const opmath_t<scalar_t>* alpha, const opmath_t<scalar_t>* beta) {
  using acc = opmath_t<scalar_t>;
  const int64_t inner = l.inner, sample = l.C * inner;
  const int64_t width = std::max<int64_t>(1, kEvalChunk / inner);  // channels per chunk
  at::parallel_for(0, (l.C + width - 1) / width, 1, [&](int64_t begin, int64_t end) {
    acc* alphas = thread_scratch<acc>(2 * width * inner);
    acc* betas = alphas + width * inner;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t c0 = chunk * width, channels = std::min(width, l.C - c0), off = c0 * inner;
      for (int64_t c = 0; c < channels; ++c) {
        const acc a = alpha[c0 + c], b = beta[c0 + c];
        acc* ac = alphas + c * inner;
        acc* bc = betas + c * inner;
#pragma omp simd
        for (int64_t i = 0; i < inner; ++i) {
          ac[i] = a;
          bc[i] = b;
        }
      }
      for (int64_t n = 0; n < l.N; ++n) {
        const int64_t at = n * sample + off;
        eval_span<scalar_t, A, kResidual>(x + at, kResidual ? z + at : nullptr, y + at, channels * inner, alphas,
                                          betas);
      }
    }
  });
}

// The eval forward on planar runs that are not whole vectors (inner above kChannelVector and not
// a multiple of it: resnet's 7x7 and 14x14 maps). Run by run, each run after the first starts
// mid-vector, so most of its vector stores straddle two cache lines; `perf` put the time of the
// 16x256x7x7 op in those stores, and the op took 1.6x a plain x * 2 over the same tensor (Xeon
// with AVX-512, 2 threads: 31 us against 19; channels-last, whose rows are whole vectors, 18).
// Here the tensor is walked as one array, a vector at a time from its start: a vector holds the
// end of one channel's run and the start of the next at most (runs are longer than a vector), and
// each lane takes its channel's constants by a select. The same arithmetic per value as run by
// run (eval_element), in vector lanes only.
template <typename scalar_t, Activation A, bool kResidual>
void eval_forward_flat(const scalar_t* x, const scalar_t* z, scalar_t* y, const BatchNormLayout& l,
                       const opmath_t<scalar_t>* alpha, const opmath_t<scalar_t>* beta) {
  using acc = opmath_t<scalar_t>;
  const int64_t C = l.C, inner = l.inner, total = l.N * C * inner;
  // The vector of values [i0, i0 + kChannelVector): `left` of them (or all) in channel c's run,
  // the rest in the next channel's.
  const auto vector_at = [&](int64_t i0, int64_t c, int64_t left) {
    const int64_t next = next_channel(c, C);
    const acc a0 = alpha[c], b0 = beta[c], a1 = alpha[next], b1 = beta[next];
    const int32_t split = static_cast<int32_t>(std::min(left, kChannelVector));
#pragma omp simd
    for (int32_t k = 0; k < int32_t(kChannelVector); ++k) {
      const bool first = k < split;
      eval_element<scalar_t, A, kResidual>(x, z, y, i0 + k, first ? a0 : a1, first ? b0 : b1);
    }
  };
  // Where value i sits: its channel, and how many values of its run start at i.
  const auto channel_and_left = [&](int64_t i) {
    const int64_t run = i / inner;
    return std::pair<int64_t, int64_t>{run % C, (run + 1) * inner - i};
  };
  const int64_t vectors = total / kChannelVector;
  at::parallel_for(0, vectors, kPiece / kChannelVector, [&](int64_t begin, int64_t end) {
    auto [c, left] = channel_and_left(begin * kChannelVector);
    for (int64_t v = begin; v < end; ++v) {
      vector_at(v * kChannelVector, c, left);
      left -= kChannelVector;
      if (left <= 0) {
        left += inner;
        c = next_channel(c, C);
      }
    }
  });
  // The values after the last whole vector: one more vector ending at the last value, over values
  // already written (the same bits again: every value goes through the vector loop, never a
  // scalar one, so a sample's output does not depend on where its batch puts it).
  if (total % kChannelVector != 0) {
    const int64_t i0 = total - kChannelVector;
    const auto [c, left] = channel_and_left(i0);
    vector_at(i0, c, left);
  }
}

inline bool eval_by_flat_vectors(const BatchNormLayout& l) {
  return !l.rows && l.inner > kChannelVector && l.inner % kChannelVector != 0;
}

// The whole eval forward of a non-empty input; zeros: C zeros (a mean column for forward_rows).
template <typename scalar_t, Activation A, bool kResidual>
void eval_forward(const scalar_t* x, const scalar_t* z, scalar_t* y, const BatchNormLayout& l,
                  const opmath_t<scalar_t>* zeros, const opmath_t<scalar_t>* alpha, const opmath_t<scalar_t>* beta) {
  using acc = opmath_t<scalar_t>;
  const int64_t C = l.C;
  if (eval_by_whole_vector_runs(l)) {
    eval_forward_whole_vector_runs<scalar_t, A, kResidual>(x, z, y, l, alpha, beta);
  } else if (eval_by_channel_chunks(l)) {
    eval_forward_channel_chunks<scalar_t, A, kResidual>(x, z, y, l, alpha, beta);
  } else if (eval_by_flat_vectors(l)) {
    eval_forward_flat<scalar_t, A, kResidual>(x, z, y, l, alpha, beta);
  } else if (!l.rows) {
    // x * alpha + beta as forward_span's (x - 0) * alpha + beta: x - 0 is x for every float.
    for_planar_parts(l, [&](int64_t off, int64_t len, int64_t c, int64_t) {
      forward_span<scalar_t, A, kResidual>(x, z, y, off, len, Affine<acc>{acc(0), alpha[c], beta[c]});
    });
  } else {
    const bool by_parts = l.per_channel() * C >= kEvalRowPartsFrom;
    at::parallel_for(0, l.per_channel(), std::max<int64_t>(1, kPiece / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
                       if (by_parts) {  // the training forward's rows pass, (x - 0) * alpha + beta
                         for_row_parts(C, begin, end,
                                       [&](auto rows_at_once, int64_t r, int64_t row_step, int64_t, int64_t c0,
                                           int64_t width) {
                                         forward_rows<decltype(rows_at_once)::value, scalar_t, A, kResidual>(
                                             x, z, y, r, row_step, C, c0, width, zeros, alpha, beta);
                                       });
                         return;
                       }
                       for (int64_t r = begin; r < end; ++r) {
                         eval_span<scalar_t, A, kResidual>(x + r * C, kResidual ? z + r * C : nullptr, y + r * C, C,
                                                           alpha, beta);
                       }
                     });
  }
}

// g = dy * act'(pre), pre recomputed from x (and z): no full-size tensor is saved for it.
template <typename acc, Activation A, bool kResidual, typename scalar_t>
inline acc upstream_grad(scalar_t dy, scalar_t x, const scalar_t* z, int64_t i, Affine<acc> a) {
  if constexpr (A == Activation::kNone) {
    return static_cast<acc>(dy);
  } else {
    acc pre = (static_cast<acc>(x) - a.mean) * a.scale + a.shift;
    if constexpr (kResidual) pre += static_cast<acc>(z[i]);
    return static_cast<acc>(dy) * activation_backward<A>(pre);
  }
}

// grad[j] added to lane j of sg and grad[j] * (x[j] - mean) to lane j of sgx, for j < count <=
// kLanes; with kStoreG, grad[j] also goes to g_out[j]. grad is dy, or grad_sums_span's buffer of g.
template <bool kStoreG, typename grad_t, typename scalar_t, typename acc>
inline void grad_sums_lanes(const grad_t* grad, const scalar_t* x, scalar_t* g_out, int64_t count, acc mean, acc* sg,
                            acc* sgx) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const acc g = static_cast<acc>(grad[j]);
    if constexpr (kStoreG) g_out[j] = static_cast<scalar_t>(g);
    sg[j] += g;
    sgx[j] += g * (static_cast<acc>(x[j]) - mean);
  }
}

// Adds one planar part's g and g * (x - mean) to the lanes sg and sgx; with kStoreG, g also goes
// to g_out (the grad_residual, which is g).
template <typename scalar_t, Activation A, bool kResidual, bool kStoreG>
inline void add_grad_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* g_out, int64_t off,
                          int64_t len, Affine<opmath_t<scalar_t>> a, opmath_t<scalar_t>* sg, opmath_t<scalar_t>* sgx) {
  using acc = opmath_t<scalar_t>;
  // Pointers at the part's start (g_out's only where it is written: it may be null).
  x += off;
  if constexpr (kStoreG) g_out += off;
  const auto sums_of = [&](const auto* grad) {  // grad: the part's dy, or its g
    in_lane_chunks(len, [&](int64_t i, int64_t count) {
      grad_sums_lanes<kStoreG>(grad + i, x + i, g_out + (kStoreG ? i : 0), count, a.mean, sg, sgx);
    });
  };
  if constexpr (A == Activation::kNone) {
    sums_of(dy + off);
  } else {
    // g goes through an L1 buffer: fused into the reduction, GCC turns the activation's
    // select into a branch around a load of dy and stops vectorising (5x slower for relu).
    acc g[kPiece];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) g[j] = upstream_grad<acc, A, kResidual>(dy[off + j], x[j], z, off + j, a);
    sums_of(static_cast<const acc*>(g));
  }
}

// (sum g, sum g * (x - mean)) over one planar part.
template <typename scalar_t, Activation A, bool kResidual, bool kStoreG>
inline std::pair<double, double> grad_sums_span(const scalar_t* dy, const scalar_t* x, const scalar_t* z,
                                                scalar_t* g_out, int64_t off, int64_t len,
                                                Affine<opmath_t<scalar_t>> a) {
  using acc = opmath_t<scalar_t>;
  acc sg[kLanes] = {}, sgx[kLanes] = {};  // by lanes (lane_tree_sum)
  add_grad_sums<scalar_t, A, kResidual, kStoreG>(dy, x, z, g_out, off, len, a, sg, sgx);
  return {double(lane_tree_sum(sg)), double(lane_tree_sum(sgx))};
}

// The same sums over all of channel c's runs (planar view, short runs: channels_resident), lanes
// kept from run to run: one pair of lane reductions per channel instead of one per run. Part by
// part, a 7x7 run's 49 values paid for two lane_tree_sums and a partial result written and
// combined again: `perf` put a third of the 16x256x7x7 NCHW backward with ReLU in that pass.
// Backward op alone, Xeon with AVX-512, 2 threads, three alternations, us, parts -> by channel:
// with ReLU 16x1024x7x7 432-502 -> 393-462, 16x2048x4x4 391-405 -> 269-318, 16x512x4x4 85-112 ->
// 60-61; plain 16x1024x7x7 368-429 -> 300-358, 16x2048x4x4 296-317 -> 218-253; inputs from memory
// (96 MiB of input sets cycled) with ReLU 16x1024x7x7 611-912 -> 421-472, 16x2048x4x4 609-896 ->
// 286-294. This pass stores no g, so the apply pass computes g again: where storing it saved
// work, with a residual (its gradient is g) on runs that are not whole vectors and with the
// costly derivatives (silu, gelu: evaluated once when stored), the parts stay: add + ReLU from
// memory at 16x256x7x7 131-133 -> 237-286 us, SiLU at 16x1024x7x7 562-563 -> 694-753. (Stores
// of g walking a channel's runs instead were up to 2x slower from memory.) Add + ReLU at 4x4
// gains (16x512x4x4 85-105 -> 70-76 cache-warm, 135-139 -> 87-93 from memory).
// A channel's result depends on its own values in their order only, as with the parts.
template <typename scalar_t, Activation A, bool kResidual>
inline std::pair<double, double> planar_channel_grad_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* z,
                                                          const BatchNormLayout& l, int64_t c,
                                                          Affine<opmath_t<scalar_t>> a) {
  using acc = opmath_t<scalar_t>;
  acc sg[kLanes] = {}, sgx[kLanes] = {};
  for_channel_pieces(l, c, [&](int64_t off, int64_t len) {
    add_grad_sums<scalar_t, A, kResidual, false>(dy, x, z, nullptr, off, len, a, sg, sgx);
  });
  return {double(lane_tree_sum(sg)), double(lane_tree_sum(sgx))};
}

// Activations whose derivative costs more than a full-size write (an exp and a division a value,
// where ReLU's is a select): the backward stores g rather than evaluate it twice.
template <Activation A>
constexpr bool kCostlyDerivative = A == Activation::kSiLU || A == Activation::kGELU || A == Activation::kGELUTanh;

// The backward walks channels (sums, then apply from L2, as torch's NCHW backward does) where
// one channel's values of a tensor take at most kChannelWalkBytes (at batch 16: every resnet50
// layer, 56x56's 196 KiB included): dy and x come from memory once instead of twice. Backward
// op, Xeon with AVX-512, 2 threads, inputs cycled through 1.2 GiB (past the last-level cache),
// two alternations, us, parts -> channel walk: 16x64x56x56 2224-2325 -> 1577-1625, with ReLU
// 2757-2841 -> 2084-2112; 16x256x28x28 2257-2329 -> 1448-1529; 16x512x14x14 1176-1252 ->
// 771-801, with ReLU 1393-1477 -> 953-977 (cache-warm 14x14: 724-758 -> 509-515, torch's
// 549). With a residual only short whole-vector runs walk (channels_resident, inner a multiple
// of 16): at 28x28 and 56x56 its walk, with or without the apply following, was no faster.
template <typename scalar_t, Activation A, bool kResidual>
inline bool sums_channel_by_channel(const BatchNormLayout& l) {
  if constexpr (kCostlyDerivative<A>) return false;
  if constexpr (kResidual) return channels_resident(l) && l.inner % kLanes == 0;
  return channels_resident(l) || channel_walk_fits(l, sizeof(scalar_t));
}

template <typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
inline void backward_element(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx, scalar_t* dz,
                             int64_t i, Affine<opmath_t<scalar_t>> a, BackwardCoeffs<opmath_t<scalar_t>> k) {
  using acc = opmath_t<scalar_t>;
  const acc g = upstream_grad<acc, A, kResidual>(dy[i], x[i], z, i, a);
  if constexpr (kGradInput) {
    dx[i] = static_cast<scalar_t>((g - k.mean_g - (static_cast<acc>(x[i]) - a.mean) * k.proj) * k.scale);
  }
  if constexpr (kGradResidual) dz[i] = static_cast<scalar_t>(g);
}

// grad_input and/or grad_residual over one planar part [off, off + len) of one channel.
template <typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
void backward_apply_span(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx, scalar_t* dz,
                         int64_t off, int64_t len, Affine<opmath_t<scalar_t>> a,
                         BackwardCoeffs<opmath_t<scalar_t>> k) {
#pragma omp simd
  for (int64_t i = off; i < off + len; ++i) {
    backward_element<scalar_t, A, kResidual, kGradInput, kGradResidual>(dy, x, z, dx, dz, i, a, k);
  }
}

// The same over every run of channel c (planar view): called right after the channel's sums
// (planar_channel_grad_sums), its dy, x and z are read again from L1/L2 instead of by a second
// pass over the tensors, as torch's NCHW backward does channel by channel. Elementwise, so the
// same bits as the parts' pass.
template <typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
void backward_apply_channel_runs(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx,
                                 scalar_t* dz, const BatchNormLayout& l, int64_t c, Affine<opmath_t<scalar_t>> a,
                                 BackwardCoeffs<opmath_t<scalar_t>> k) {
  for_channel_pieces(l, c, [&](int64_t off, int64_t len) {
    backward_apply_span<scalar_t, A, kResidual, kGradInput, kGradResidual>(dy, x, z, dx, dz, off, len, a, k);
  });
}

// The same over planar parts [begin, end): one call per task, not per part (the apply pass is
// chosen at run time through a function pointer, and resnet50's 4x4 layers have 16-value parts).
template <typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
void backward_apply_parts(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx, scalar_t* dz,
                          const PlanarParts& parts, int64_t begin, int64_t end, const Affine<opmath_t<scalar_t>>* a,
                          const BackwardCoeffs<opmath_t<scalar_t>>* k) {
  planar_parts_in(parts, begin, end, [&](int64_t off, int64_t len, int64_t c, int64_t) {
    backward_apply_span<scalar_t, A, kResidual, kGradInput, kGradResidual>(dy, x, z, dx, dz, off, len, a[c], k[c]);
  });
}

// The same for channel c of rows r, r + row_step, ... (kRows rows: for_row_parts) of the rows view.
template <int64_t kRows, typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
inline void backward_apply_channel(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx, scalar_t* dz,
                                   int64_t r, int64_t row_step, int64_t C, int64_t c, const opmath_t<scalar_t>* mean,
                                   const opmath_t<scalar_t>* scale, const opmath_t<scalar_t>* shift,
                                   const opmath_t<scalar_t>* mean_g, const opmath_t<scalar_t>* proj,
                                   const opmath_t<scalar_t>* kscale) {
  using acc = opmath_t<scalar_t>;
  const Affine<acc> a{mean[c], scale[c], shift[c]};
  const BackwardCoeffs<acc> k{mean_g[c], proj[c], kscale[c]};
  unrolled<kRows>([&](auto j) {
    backward_element<scalar_t, A, kResidual, kGradInput, kGradResidual>(dy, x, z, dx, dz, (r + j * row_step) * C + c, a,
                                                                        k);
  });
}

// ... and for channels [c0, c0 + width) (ChannelVectors).
template <int64_t kRows, typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
inline void backward_apply_row(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx, scalar_t* dz,
                               int64_t r, int64_t row_step, int64_t C, int64_t c0, int64_t width,
                               const opmath_t<scalar_t>* mean, const opmath_t<scalar_t>* scale,
                               const opmath_t<scalar_t>* shift, const opmath_t<scalar_t>* mean_g,
                               const opmath_t<scalar_t>* proj, const opmath_t<scalar_t>* kscale) {
  const ChannelVectors v(c0, width);
#pragma omp simd
  for (int64_t c = c0; c < v.full_end; ++c) {
    backward_apply_channel<kRows, scalar_t, A, kResidual, kGradInput, kGradResidual>(
        dy, x, z, dx, dz, r, row_step, C, c, mean, scale, shift, mean_g, proj, kscale);
  }
  if (v.overlap) {
#pragma omp simd
    for (int64_t k = 0; k < kChannelVector; ++k) {
      backward_apply_channel<kRows, scalar_t, A, kResidual, kGradInput, kGradResidual>(
          dy, x, z, dx, dz, r, row_step, C, v.last + k, mean, scale, shift, mean_g, proj, kscale);
    }
  }
  for (int64_t c = v.full_end; c < v.scalar_end; ++c) {
    backward_apply_channel<kRows, scalar_t, A, kResidual, kGradInput, kGradResidual>(
        dy, x, z, dx, dz, r, row_step, C, c, mean, scale, shift, mean_g, proj, kscale);
  }
}

// Rows [begin, end) of the rows view.
template <typename scalar_t, Activation A, bool kResidual, bool kGradInput, bool kGradResidual>
void backward_apply_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx, scalar_t* dz,
                         int64_t begin, int64_t end, int64_t C, const AffineColumns<opmath_t<scalar_t>>& a,
                         const CoeffColumns<opmath_t<scalar_t>>& k) {
  for_row_parts(C, begin, end, [&](auto rows_at_once, int64_t r, int64_t row_step, int64_t, int64_t c0, int64_t width) {
    backward_apply_row<decltype(rows_at_once)::value, scalar_t, A, kResidual, kGradInput, kGradResidual>(
        dy, x, z, dx, dz, r, row_step, C, c0, width, a.mean.data(), a.scale.data(), a.shift.data(), k.mean_g.data(),
        k.proj.data(), k.scale.data());
  });
}

// (sum g, sum g * (x - mean)) of channel c over rows r, r + row_step, ... (kRows rows:
// for_row_parts), added to sg[c] and sgx[c] when `take`; with kStoreG, g also goes to g_out.
template <int64_t kRows, typename scalar_t, Activation A, bool kResidual, bool kStoreG>
inline void grad_sums_channel(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* g_out, int64_t r,
                              int64_t row_step, int64_t C, int64_t c, const opmath_t<scalar_t>* mean,
                              const opmath_t<scalar_t>* scale, const opmath_t<scalar_t>* shift, opmath_t<scalar_t>* sg,
                              opmath_t<scalar_t>* sgx, bool take) {
  using acc = opmath_t<scalar_t>;
  // One loop, g in a register: per row 5 + 5 / kRows loads and 2 / kRows stores a value (dy, x, z;
  // the three constants and the two sums once per kRows rows), where g written to scratch and
  // read back in a second loop made 11 and 3 for one row. GCC vectorises it for every activation
  // (unlike grad_sums_span's reduction: no branch around dy). Fused add + ReLU backward,
  // channels-last, cold inputs, three A/B alternations: 16x1024x7x7 0.98 -> 0.86 ms (mean of
  // medians), 14x14 and 28x28 unchanged within this host's noise.
  const Affine<acc> a{mean[c], scale[c], shift[c]};
  // Loads of both sums before any store (see rows_welford_channel: sg and sgx are C apart, and
  // g_out lies anywhere relative to them).
  const acc sg0 = sg[c], sgx0 = sgx[c];
  acc sum_g = sg0, sum_gx = sgx0;
  unrolled<kRows>([&](auto j) {
    const int64_t i = (r + j * row_step) * C + c;
    const acc xi = static_cast<acc>(x[i]);
    const acc gi = upstream_grad<acc, A, kResidual>(dy[i], x[i], z, i, a);
    if constexpr (kStoreG) g_out[i] = static_cast<scalar_t>(gi);
    sum_g += gi;
    sum_gx += gi * (xi - a.mean);
  });
  sg[c] = take ? sum_g : sg0;
  sgx[c] = take ? sum_gx : sgx0;
}

// The same for channels [c0, c0 + width) (ChannelVectors).
template <int64_t kRows, typename scalar_t, Activation A, bool kResidual, bool kStoreG>
inline void grad_sums_row(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* g_out, int64_t r,
                          int64_t row_step, int64_t C, int64_t c0, int64_t width, const opmath_t<scalar_t>* mean,
                          const opmath_t<scalar_t>* scale, const opmath_t<scalar_t>* shift, opmath_t<scalar_t>* sg,
                          opmath_t<scalar_t>* sgx) {
  const ChannelVectors v(c0, width);
#pragma omp simd
  for (int64_t c = c0; c < v.full_end; ++c) {
    grad_sums_channel<kRows, scalar_t, A, kResidual, kStoreG>(dy, x, z, g_out, r, row_step, C, c, mean, scale, shift,
                                                               sg, sgx, true);
  }
  if (v.overlap) {
#pragma omp simd
    for (int64_t k = 0; k < kChannelVector; ++k) {
      const int64_t c = v.last + k;
      grad_sums_channel<kRows, scalar_t, A, kResidual, kStoreG>(dy, x, z, g_out, r, row_step, C, c, mean, scale, shift,
                                                                 sg, sgx, c >= v.full_end);
    }
  }
  for (int64_t c = v.full_end; c < v.scalar_end; ++c) {
    grad_sums_channel<kRows, scalar_t, A, kResidual, kStoreG>(dy, x, z, g_out, r, row_step, C, c, mean, scale, shift,
                                                               sg, sgx, true);
  }
}

// The same for rows [begin, end) when a row is one tile of kTile channels (with_row_tile): the
// two sums and the tile's constants stay in registers down the rows and are added to sg and sgx
// once. The same arithmetic per channel, the rows in their order.
template <int64_t kTile, typename scalar_t, Activation A, bool kResidual, bool kStoreG>
inline void grad_sums_tile(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* g_out, int64_t begin,
                           int64_t end, const opmath_t<scalar_t>* mean, const opmath_t<scalar_t>* scale,
                           const opmath_t<scalar_t>* shift, opmath_t<scalar_t>* sg, opmath_t<scalar_t>* sgx) {
  using acc = opmath_t<scalar_t>;
  acc m[kTile], sc[kTile], sh[kTile], sum_g[kTile], sum_gx[kTile];
#pragma omp simd
  for (int64_t j = 0; j < kTile; ++j) {
    m[j] = mean[j];
    sc[j] = scale[j];
    sh[j] = shift[j];
    sum_g[j] = sg[j];
    sum_gx[j] = sgx[j];
  }
  for (int64_t r = begin; r < end; ++r) {
    const int64_t base = r * kTile;
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) {
      const acc xj = static_cast<acc>(x[base + j]);
      const acc gj =
          upstream_grad<acc, A, kResidual>(dy[base + j], x[base + j], z, base + j, Affine<acc>{m[j], sc[j], sh[j]});
      if constexpr (kStoreG) g_out[base + j] = static_cast<scalar_t>(gj);
      sum_g[j] += gj;
      sum_gx[j] += gj * (xj - m[j]);
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < kTile; ++j) {
    sg[j] = sum_g[j];
    sgx[j] = sum_gx[j];
  }
}

// on_channel(c, sum_g, sum_gxmu) for every channel, the sums taken over parts (row blocks, or
// planar parts by slot) given as partial[p][2][c], in part order: channel ranges in parallel,
// parts outermost within one (walking one channel down the parts touched a new cache line per
// part).
template <typename F>
void sum_part_grads(int64_t parts, int64_t C, const double* partial, F&& on_channel) {
  at::parallel_for(0, C, 512, [&](int64_t begin, int64_t end) {
    std::vector<double> sum_g(end - begin, 0.0), sum_gxmu(end - begin, 0.0);
    for (int64_t p = 0; p < parts; ++p) {
      const double* g = partial + 2 * p * C + begin;
      const double* gx = g + C;
      for (int64_t j = 0; j < end - begin; ++j) {
        sum_g[j] += g[j];
        sum_gxmu[j] += gx[j];
      }
    }
    for (int64_t c = begin; c < end; ++c) on_channel(c, sum_g[c - begin], sum_gxmu[c - begin]);
  });
}

// Which of grad_input / grad_residual the apply pass writes is chosen at run time between
// these small loops (a call per task: a range of planar parts or of rows). Instantiating the whole backward once
// per pair compiled it four times over and was no faster (benchmarks/results/build-time/).
template <typename scalar_t, Activation A, bool kResidual>
struct BackwardApply {
  decltype(&backward_apply_parts<scalar_t, A, kResidual, true, false>) parts = nullptr;
  decltype(&backward_apply_rows<scalar_t, A, kResidual, true, false>) rows = nullptr;
  decltype(&backward_apply_channel_runs<scalar_t, A, kResidual, true, false>) channel_runs = nullptr;

  BackwardApply(bool grad_input, bool grad_residual) {
    if (grad_input && grad_residual) {
      set<true, true>();
    } else if (grad_input) {
      set<true, false>();
    } else if (grad_residual) {
      set<false, true>();
    }
  }
  explicit operator bool() const { return parts != nullptr; }

 private:
  template <bool kGradInput, bool kGradResidual>
  void set() {
    parts = &backward_apply_parts<scalar_t, A, kResidual, kGradInput, kGradResidual>;
    rows = &backward_apply_rows<scalar_t, A, kResidual, kGradInput, kGradResidual>;
    channel_runs = &backward_apply_channel_runs<scalar_t, A, kResidual, kGradInput, kGradResidual>;
  }
};

// ---------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, Activation A, bool kResidual>
void forward_cpu_typed(BatchNormForwardPlan& p) {
  using acc = opmath_t<scalar_t>;
  using stat_t = acc;  // float for half/bfloat16/float inputs, double for double
  const auto& l = p.layout;
  const int64_t C = l.C;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* z = kResidual ? p.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y = p.output.mutable_data_ptr<scalar_t>();
  stat_t* save_mean = p.save_mean.mutable_data_ptr<stat_t>();
  stat_t* save_invstd = p.save_invstd.mutable_data_ptr<stat_t>();
  const stat_t* w = p.weight.defined() ? p.weight.const_data_ptr<stat_t>() : nullptr;
  const stat_t* b = p.bias.defined() ? p.bias.const_data_ptr<stat_t>() : nullptr;
  const stat_t* rm = p.running_mean.defined() ? p.running_mean.const_data_ptr<stat_t>() : nullptr;
  const stat_t* rv = p.running_var.defined() ? p.running_var.const_data_ptr<stat_t>() : nullptr;
  stat_t* new_rm = p.update_running ? p.new_running_mean.mutable_data_ptr<stat_t>() : nullptr;
  stat_t* new_rv = p.update_running ? p.new_running_var.mutable_data_ptr<stat_t>() : nullptr;
  const bool empty = p.output.numel() == 0;

  auto finalize = [&](int64_t c, const WelfordData<double>& stats) {
    double m, is, nrm = 0, nrv = 0;
    batch_norm_finalize_channel<double>(stats, p.eps, p.momentum, p.update_running, rm ? double(rm[c]) : 0.0,
                                        rv ? double(rv[c]) : 0.0, &m, &is, &nrm, &nrv);
    save_mean[c] = stat_t(m);
    save_invstd[c] = stat_t(is);
    if (p.update_running) {
      new_rm[c] = stat_t(nrm);
      new_rv[c] = stat_t(nrv);
    }
  };

  // Eval: the running statistics are the ones to normalise with (and to save).
  if (!p.training) {
    std::unique_ptr<acc[]> constants(new acc[3 * C]());  // zeros, alpha, beta
    acc* alpha = constants.get() + C;
    eval_constants<acc, stat_t>(C, p.eps, rm, rv, w, b, save_mean, save_invstd, alpha, alpha + C);
    if (!empty) eval_forward<scalar_t, A, kResidual>(x, z, y, l, constants.get(), alpha, alpha + C);
    return;
  }
  if (empty) {
    for_each_channel(C, [&](int64_t c) { finalize(c, WelfordData<double>{}); });
    return;
  }
  if (channels_resident(l)) {
    const int64_t pc = l.per_channel();
    for_channel_blocks(l, [&](int64_t c0, int64_t width) {
      scalar_t* buf = thread_scratch<scalar_t>(width * pc);
      Affine<acc>* affine = thread_scratch<Affine<acc>>(width);
      gathered_channel_stats(x, l, c0, width, buf, [&](int64_t c, const WelfordData<double>& stats) {
        finalize(c, stats);
        affine[c - c0] = affine_of<acc>(c, save_mean, save_invstd, w, b);
      });
      for_block_runs(l, c0, width, [&](int64_t b, int64_t t, int64_t c) {
        forward_span<scalar_t, A, kResidual>(buf + b, kResidual ? z + t : nullptr, y + t, 0, l.inner,
                                             affine[c - c0]);
      });
    });
    return;
  }
  if (forward_walks_channels(l, sizeof(scalar_t))) {
    for_channel_blocks(l, [&](int64_t c0, int64_t width) {
      for (int64_t c = c0; c < c0 + width; ++c) {
        finalize(c, planar_channel_stats(x, l, c));
        const auto a = affine_of<acc>(c, save_mean, save_invstd, w, b);
        for_channel_pieces(l, c, [&](int64_t off, int64_t len) {
          forward_span<scalar_t, A, kResidual>(x, z, y, off, len, a);
        });
      }
    });
    return;
  }
  // The channel constants, as structs for the planar pass or as columns for the rows pass, set
  // in the same parallel region as the statistics they come from: each region wakes the other
  // threads, a few microseconds that count at resnet50's 4x4 layers.
  std::vector<Affine<acc>> affine(l.rows ? 0 : C);
  AffineColumns<acc> columns(l.rows ? C : 0);
  auto set_constants = [&](int64_t c) {
    const auto a = affine_of<acc>(c, save_mean, save_invstd, w, b);
    if (l.rows) {
      columns.set(c, a);
    } else {
      affine[c] = a;
    }
  };
  all_channel_stats(x, l, [&](int64_t c, const WelfordData<double>& stats) {
    finalize(c, stats);
    set_constants(c);
  });
  if (!l.rows) {
    for_planar_parts(l, [&](int64_t off, int64_t len, int64_t c, int64_t) {
      forward_span<scalar_t, A, kResidual>(x, z, y, off, len, affine[c]);
    });
  } else {
    at::parallel_for(0, l.per_channel(), std::max<int64_t>(1, kPiece / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
                       for_row_parts(C, begin, end,
                                     [&](auto rows_at_once, int64_t r, int64_t row_step, int64_t, int64_t c0,
                                         int64_t width) {
                                       forward_rows<decltype(rows_at_once)::value, scalar_t, A, kResidual>(
                                           x, z, y, r, row_step, C, c0, width, columns.mean.data(),
                                           columns.scale.data(), columns.shift.data());
                                     });
                     });
  }
}

// ---------------------------------------------------------------------------------------
// Backward

template <typename scalar_t, Activation A, bool kResidual>
void backward_cpu_typed(BatchNormBackwardPlan& p) {
  using acc = opmath_t<scalar_t>;
  using stat_t = acc;
  const auto& l = p.layout;
  const int64_t C = l.C;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_output.const_data_ptr<scalar_t>();
  const scalar_t* z = kResidual ? p.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = p.mask[0] ? p.grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dz = p.mask[3] ? p.grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  const stat_t* mean = p.save_mean.const_data_ptr<stat_t>();
  const stat_t* invstd = p.save_invstd.const_data_ptr<stat_t>();
  const stat_t* w = p.weight.defined() ? p.weight.const_data_ptr<stat_t>() : nullptr;
  const stat_t* b = p.bias.defined() ? p.bias.const_data_ptr<stat_t>() : nullptr;
  const bool empty = p.input.numel() == 0;
  const bool need_sums = !empty && (p.mask[1] || p.mask[2] || (p.mask[0] && p.training));
  // Global coefficients given by batch_norm_backward_elemt (SyncBatchNorm), else null.
  const stat_t* ext_mean_g = p.mean_g.defined() ? p.mean_g.const_data_ptr<stat_t>() : nullptr;
  const stat_t* ext_mean_gxhat = p.mean_gxhat.defined() ? p.mean_gxhat.const_data_ptr<stat_t>() : nullptr;
  // grad_residual is g = dy * act'(pre) itself. When the sums pass runs it stores g there, and
  // the apply pass reads g back for grad_input (where the stored g is exact: scalar_t is the
  // accumulation type) instead of recomputing it from dy, x and z: 7 full-size passes instead of
  // 8, one fewer than torch's relu backward + batch norm backward (which also write g once).
  // Without a residual gradient to hold it, g goes to grad_input where the derivative costs more
  // than a full-size write (silu, gelu, gelu_tanh: an exp and a division a value, where ReLU's is
  // a select), and the apply pass turns it into grad_input in place: the derivative once, not
  // twice. Batch norm + SiLU's forward+backward, AVX2 EPYC, one thread, channels-last
  // 8x96x28x28: 3.41-3.55 -> 2.54-2.63 ns a value (torch's pair 3.7-3.9); with GELU 4.4 ->
  // 3.2-3.5. Not where a rows pass ends with an overlapping vector (ChannelVectors: C above 16
  // and not a multiple of it), which in place would apply twice. Nor where the sums go channel
  // by channel (planar_channel_grad_sums, below), which store nothing: the choice of pass
  // depends on the layout, the activation and whether there is a residual, never on which
  // gradients are asked for, so every gradient has the same bits whichever are.
  const bool sums_by_channel = sums_channel_by_channel<scalar_t, A, kResidual>(l);
  const bool g_in_grad_input = kCostlyDerivative<A> && std::is_same_v<scalar_t, acc> && need_sums && p.mask[0] &&
                               !p.mask[3] && (!l.rows || !ChannelVectors(0, C).overlap);
  const bool store_g = need_sums && !sums_by_channel && (p.mask[3] || g_in_grad_input);
  scalar_t* g_out = p.mask[3] ? dz : dx;  // where the sums pass stores g
  const bool apply_from_g = store_g && std::is_same_v<scalar_t, acc>;
  const BackwardApply<scalar_t, A, kResidual> apply(p.mask[0] && !apply_from_g, p.mask[3] && !store_g);
  const BackwardApply<scalar_t, Activation::kNone, false> apply_g(p.mask[0] && apply_from_g, false);

  // Per-channel results from the two sums: parameter grads and the grad_input coefficients.
  // (The pointers are taken once: mutable_data_ptr's checks per channel were 6% of a
  // 16x512x4x4 channels-last backward.)
  stat_t* grad_weight = p.mask[1] ? p.grad_weight.mutable_data_ptr<stat_t>() : nullptr;
  stat_t* grad_bias = p.mask[2] ? p.grad_bias.mutable_data_ptr<stat_t>() : nullptr;
  auto finalize = [&](int64_t c, double sum_g, double sum_gxmu) {
    if (grad_weight) grad_weight[c] = stat_t(sum_gxmu * double(invstd[c]));
    if (grad_bias) grad_bias[c] = stat_t(sum_g);
    auto k = batch_norm_backward_coeffs<double>(sum_g, sum_gxmu, l.per_channel(), double(invstd[c]),
                                                w ? double(w[c]) : 1.0, p.training);
    if (ext_mean_g) {
      k.mean_g = double(ext_mean_g[c]);
      k.proj = double(ext_mean_gxhat[c]) * double(invstd[c]);
    }
    return BackwardCoeffs<acc>{acc(k.mean_g), acc(k.proj), acc(k.scale)};
  };

  // The channel constants, as structs for the planar passes or as columns for the rows passes.
  std::vector<Affine<acc>> affine(l.rows ? 0 : C);
  AffineColumns<acc> columns(l.rows ? C : 0);
  for_each_channel(C, [&](int64_t c) {
    const auto a = affine_of<acc>(c, mean, invstd, w, b);
    if (l.rows) {
      columns.set(c, a);
    } else {
      affine[c] = a;
    }
  });
  // grad_input's coefficients per channel, set where the channel's sums are complete.
  std::vector<BackwardCoeffs<acc>> coeffs(l.rows ? 0 : C);
  CoeffColumns<acc> coeff_columns(l.rows ? C : 0);
  auto set_coeffs = [&](int64_t c, double sum_g, double sum_gxmu) {
    const auto k = finalize(c, sum_g, sum_gxmu);
    if (l.rows) {
      coeff_columns.set(c, k);
    } else {
      coeffs[c] = k;
    }
  };
  // Channel by channel, the apply follows each channel's sums (store_g is false there), without a
  // residual: with one (five tensors' runs per channel, a power-of-two stride apart at
  // 16x2048x4x4) the backward took up to 1.8x its time with the separate apply pass.
  const bool apply_with_sums = need_sums && sums_by_channel && apply && !kResidual;
  if (need_sums && sums_by_channel) {
    for_channel_blocks(l, [&](int64_t c0, int64_t width) {
      for (int64_t c = c0; c < c0 + width; ++c) {
        const auto [g, gx] = planar_channel_grad_sums<scalar_t, A, kResidual>(dy, x, z, l, c, affine[c]);
        set_coeffs(c, g, gx);
        if (apply_with_sums) apply.channel_runs(dy, x, z, dx, dz, l, c, affine[c], coeffs[c]);
      }
    });
  } else if (need_sums && !l.rows) {
    const PlanarParts parts(l);
    auto partial = part_results(2 * parts.slots() * C);  // [slot][2][c], as the row blocks' below
    BATCHOPS_DISPATCH_BOOL(store_g, kStoreG, [&] {
      for_planar_parts(l, [&](int64_t off, int64_t len, int64_t c, int64_t slot) {
        const auto [g, gx] = grad_sums_span<scalar_t, A, kResidual, kStoreG>(dy, x, z, g_out, off, len, affine[c]);
        partial[2 * slot * C + c] = g;
        partial[2 * slot * C + C + c] = gx;
      });
    });
    sum_part_grads(parts.slots(), C, partial.get(), set_coeffs);
  } else if (need_sums) {
    RowBlocks blocks(l);
    auto partial = part_results(2 * blocks.count * C);  // [b][2][c]
    BATCHOPS_DISPATCH_BOOL(store_g, kStoreG, [&] {
      at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc> scratch(2 * C);  // sg, sgx
        for (int64_t blk = begin; blk < end; ++blk) {
          std::fill(scratch.begin(), scratch.end(), acc(0));
          const bool tiled = with_row_tile<scalar_t, kGradSumsWidestTile>(C, [&](auto tile) {
            grad_sums_tile<decltype(tile)::value, scalar_t, A, kResidual, kStoreG>(
                dy, x, z, g_out, blocks.begin(blk), blocks.end(blk), columns.mean.data(), columns.scale.data(),
                columns.shift.data(), scratch.data(), scratch.data() + C);
          });
          if (!tiled) {
            for_row_parts(C, blocks.begin(blk), blocks.end(blk),
                          [&](auto rows_at_once, int64_t r, int64_t row_step, int64_t, int64_t c0, int64_t width) {
                            grad_sums_row<decltype(rows_at_once)::value, scalar_t, A, kResidual, kStoreG>(
                                dy, x, z, g_out, r, row_step, C, c0, width, columns.mean.data(), columns.scale.data(),
                                columns.shift.data(), scratch.data(), scratch.data() + C);
                          });
          }
          std::copy(scratch.begin(), scratch.begin() + 2 * C, partial.get() + 2 * blk * C);
        }
      });
    });
    sum_part_grads(blocks.count, C, partial.get(), set_coeffs);
  } else {
    for_each_channel(C, [&](int64_t c) { set_coeffs(c, 0.0, 0.0); });
  }
  if (empty || !(apply || apply_g) || apply_with_sums) return;
  // parts and rows: an apply pass's loops; apply_g's are plain batch norm's, given g for dy.
  const auto run_apply = [&](auto parts, auto rows, const scalar_t* dy_or_g, const scalar_t* z_or_null,
                             scalar_t* dz_or_null) {
    if (!l.rows) {
      for_planar_part_ranges(l, [&](const PlanarParts& ranges, int64_t begin, int64_t end) {
        parts(dy_or_g, x, z_or_null, dx, dz_or_null, ranges, begin, end, affine.data(), coeffs.data());
      });
    } else {
      at::parallel_for(0, l.per_channel(), std::max<int64_t>(1, kPiece / std::max<int64_t>(C, 1)),
                       [&](int64_t begin, int64_t end) {
                         rows(dy_or_g, x, z_or_null, dx, dz_or_null, begin, end, C, columns, coeff_columns);
                       });
    }
  };
  if (apply_g) {
    run_apply(apply_g.parts, apply_g.rows, g_out, nullptr, nullptr);  // in place when g_out is dx
  } else {
    run_apply(apply.parts, apply.rows, dy, z, store_g ? nullptr : dz);
  }
}

// Statistics only (batch_norm_stats): the same parts, merged in the same order, as the
// training forward, so the result equals what it normalises with.
template <typename scalar_t>
void stats_cpu_typed(BatchNormStatsPlan& p) {
  using stat_t = opmath_t<scalar_t>;
  const auto& l = p.layout;
  stat_t* mean = p.mean.mutable_data_ptr<stat_t>();
  stat_t* m2 = p.m2.mutable_data_ptr<stat_t>();
  if (p.input.numel() == 0) {
    for (int64_t c = 0; c < l.C; ++c) mean[c] = m2[c] = stat_t(0);
    return;
  }
  all_channel_stats(p.input.const_data_ptr<scalar_t>(), l, [&](int64_t c, const WelfordData<double>& stats) {
    mean[c] = stat_t(stats.mean);
    m2[c] = stat_t(stats.m2);
  });
}

}  // namespace

void batch_norm_stats_kernel(BatchNormStatsPlan& p) {
  BATCHOPS_CPU_DISPATCH_DTYPES(p.input.scalar_type(), "batchops_batch_norm_stats_cpu",
                               [&] { stats_cpu_typed<scalar_t>(p); });
}

void batch_norm_forward_kernel(BatchNormForwardPlan& p) {
  BATCHOPS_CPU_DISPATCH_DTYPES(p.input.scalar_type(), "batchops_batch_norm_forward_cpu", [&] {
    BATCHOPS_DISPATCH_ACTIVATION(p.activation, [&] {
      BATCHOPS_DISPATCH_BOOL(p.residual.defined(), kResidual, [&] { forward_cpu_typed<scalar_t, kAct, kResidual>(p); });
    });
  });
}

void batch_norm_backward_kernel(BatchNormBackwardPlan& p) {
  BATCHOPS_CPU_DISPATCH_DTYPES(p.input.scalar_type(), "batchops_batch_norm_backward_cpu", [&] {
    BATCHOPS_DISPATCH_ACTIVATION(p.activation, [&] {
      BATCHOPS_DISPATCH_BOOL(p.residual.defined(), kResidual,
                             [&] { backward_cpu_typed<scalar_t, kAct, kResidual>(p); });
    });
  });
}

}  // namespace BATCHOPS_CPU_NS
}  // namespace batchops
