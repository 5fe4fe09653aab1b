// The max pool forward on the CPU, compiled once per instruction set (cpu.cpp, cpu_avx2.cpp,
// cpu_avx512.cpp), each time inside its own namespace BATCHOPS_CPU_NS; cpu.cpp picks one at run
// time (common/cpu_isa.h). How it walks the windows, and why: csrc/README.md "Max pool".
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "max_pool/max_pool.h"
#include "common/cpu_dtypes.h"  // BATCHOPS_CPU_DISPATCH_DTYPES for this build

#ifndef BATCHOPS_CPU_NS
#error "define BATCHOPS_CPU_NS before including max_pool/cpu_kernels.h"
#endif

namespace batchops {
namespace BATCHOPS_CPU_NS {
namespace {

// The first window position inside the input for output o, as torch starts its scan.
int64_t first_inside(const PoolAxis& a, int64_t o) {
  int64_t i = o * a.stride - a.padding;
  while (i < 0) i += a.dilation;
  return i;
}

// Outputs [lo, hi) whose window position k lies inside the input.
std::pair<int64_t, int64_t> outputs_inside(const PoolAxis& a, int64_t k) {
  const int64_t shift = k * a.dilation - a.padding;  // input = o * stride + shift
  const int64_t lo = shift >= 0 ? 0 : (-shift + a.stride - 1) / a.stride;
  const int64_t hi = a.in - 1 - shift >= 0 ? std::min(a.out, (a.in - 1 - shift) / a.stride + 1) : 0;
  return {lo, std::max(lo, hi)};
}

// Branch-free (a branch per value mispredicts on real data: that is what makes torch's planar
// kernel slow), with positions as 32-bit integers in the loops, the width of a float, so the
// loops vectorise; they are widened to int64 when stored.
template <typename acc_t>
inline void keep_larger(acc_t v, int32_t position, acc_t& best, int32_t& best_position) {
  const bool take = (v > best) | (v != v);  // NaN wins, as in torch
  best = take ? v : best;
  best_position = take ? position : best_position;
}

// One output, its window scanned in torch's order with bounds tests: the outputs at the edges
// of a row in the fast path below.
template <typename scalar_t>
void one_output(const scalar_t* x, const PoolAxis& h, const PoolAxis& w, int64_t oh, int64_t ow, scalar_t* y,
                int64_t* idx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ih_first = first_inside(h, oh), iw_first = first_inside(w, ow);
  const int64_t ih_end = std::min(oh * h.stride - h.padding + (h.kernel - 1) * h.dilation + 1, h.in);
  const int64_t iw_end = std::min(ow * w.stride - w.padding + (w.kernel - 1) * w.dilation + 1, w.in);
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int32_t best_position = static_cast<int32_t>(ih_first * w.in + iw_first);
  for (int64_t ih = ih_first; ih < ih_end; ih += h.dilation) {
    for (int64_t iw = iw_first; iw < iw_end; iw += w.dilation) {
      keep_larger<acc_t>(static_cast<acc_t>(x[ih * w.in + iw]), static_cast<int32_t>(ih * w.in + iw), best,
                         best_position);
    }
  }
  *y = static_cast<scalar_t>(best);
  *idx = best_position;
}

// Outputs [begin, end) of one output row, NR input rows (those inside the input) of KW adjacent
// columns each, stride SW along the row: the window loops unroll, the loop over outputs
// vectorises and each output's best stays in registers. r[k] points at input row k's column
// for output 0's first window column, base[k] is that column's index in the plane.
template <typename scalar_t, int NR, int KW, int SW>
void output_run(const scalar_t* const* rows, const int32_t* row_base, int64_t begin, int64_t end,
                scalar_t* __restrict__ y, int64_t* __restrict__ idx) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* r[NR];  // local copies: values in registers, not loads the stores may alias
  int32_t base[NR];
  for (int k = 0; k < NR; ++k) r[k] = rows[k], base[k] = row_base[k];
#pragma omp simd
  for (int64_t ow = begin; ow < end; ++ow) {
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int32_t best_position = base[0] + SW * static_cast<int32_t>(ow);
    for (int k = 0; k < NR; ++k) {
      for (int kw = 0; kw < KW; ++kw) {
        keep_larger<acc_t>(static_cast<acc_t>(r[k][SW * ow + kw]), base[k] + SW * static_cast<int32_t>(ow) + kw, best,
                           best_position);
      }
    }
    y[ow] = static_cast<scalar_t>(best);
    idx[ow] = best_position;
  }
}

// 16 float32 outputs of one output row in GCC vector types (one AVX-512 register each; two AVX2
// or four SSE registers in the other builds). The plain loop above vectorises too, but GCC
// only enters its vector body for long rows (resnet's are 27 interior outputs) and the scalar
// remainder, branchy, cost more than the vector part.
// A GCC vector type V from / to unaligned memory.
template <typename V, typename T>
inline V load_vector(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
inline void store_vector(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

namespace vec16 {
using floats = float __attribute__((vector_size(64)));
using ints = int32_t __attribute__((vector_size(64)));
using longs = int64_t __attribute__((vector_size(128)));

inline floats load(const float* p) { return load_vector<floats>(p); }

// p[0], p[S], ..., p[15 S] for S = 1 or 2, reading nothing past p[15 S] (the second load of
// stride 2 starts at p[15] so that a row's last value may end the allocation).
template <int S>
inline floats load_strided(const float* p) {
  if constexpr (S == 1) {
    return load(p);
  } else {
    const floats a = load(p), b = load(p + 15);
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31);
  }
}

// Outputs ow0 .. ow0 + 15; r[k] and base[k] as in output_run.
template <int NR, int KW, int SW>
inline void outputs(const float* const* r, const int32_t* base, int64_t ow0, float* y, int64_t* idx) {
  const ints lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const ints column = (static_cast<int32_t>(ow0) + lane) * SW;  // each output's first window column
  floats best = -std::numeric_limits<float>::infinity() + floats{};
  ints best_position = base[0] + column;
  for (int k = 0; k < NR; ++k) {
    for (int kw = 0; kw < KW; ++kw) {
      const floats v = load_strided<SW>(r[k] + SW * ow0 + kw);
      const ints take = (v > best) | (v != v);  // NaN wins, as in torch
      best = take ? v : best;
      best_position = take ? base[k] + column + kw : best_position;
    }
  }
  store_vector(y + ow0, best);
  store_vector(idx + ow0, __builtin_convertvector(best_position, longs));
}
}  // namespace vec16

// Whether vec16 runs in this build: AVX-512 only. GCC lowers its 64-byte vectors into AVX2 (and
// SSE) code that goes through the stack element by element: on an AMD EPYC without AVX-512 the
// AVX2 build's stem pool (16x64x56x56, 3x3 stride 2) took 24 ms against torch's 14.
#if BATCHOPS_CPU_VARIANT_AVX512
constexpr bool kVec16InRegisters = true;
#else
constexpr bool kVec16InRegisters = false;
#endif

// Outputs [lo, hi) of one output row, whose windows lie inside the input's width: float32 in
// runs of 16 (vec16), the last one ending at hi and perhaps overlapping the one before (those
// outputs are computed twice, to the same values); other dtypes and short rows in one loop.
// rows[k] is input row k of the window and row_positions[k] its index of column `shift`
// (output 0's first window column).
template <typename scalar_t, int NR, int KW, int SW>
void interior_outputs(const scalar_t* const* rows, const int32_t* row_positions, int64_t shift, int64_t lo, int64_t hi,
                      scalar_t* y, int64_t* idx) {
  const scalar_t* r[NR];
  for (int k = 0; k < NR; ++k) r[k] = rows[k] + shift;
  if constexpr (std::is_same_v<scalar_t, float> && kVec16InRegisters) {
    if (hi - lo >= 16) {
      int64_t ow = lo;
      for (; ow + 16 <= hi; ow += 16) vec16::outputs<NR, KW, SW>(r, row_positions, ow, y, idx);
      if (ow < hi) vec16::outputs<NR, KW, SW>(r, row_positions, hi - 16, y, idx);
      return;
    }
  }
  output_run<scalar_t, NR, KW, SW>(r, row_positions, lo, hi, y, idx);
}

template <typename scalar_t>
using InteriorFn = void (*)(const scalar_t* const*, const int32_t*, int64_t, int64_t, int64_t, scalar_t*, int64_t*);

template <typename scalar_t, int NR>
InteriorFn<scalar_t> interior_for(int64_t kw, int64_t sw) {
  if (kw == 2) return sw == 1 ? &interior_outputs<scalar_t, NR, 2, 1> : &interior_outputs<scalar_t, NR, 2, 2>;
  return sw == 1 ? &interior_outputs<scalar_t, NR, 3, 1> : &interior_outputs<scalar_t, NR, 3, 2>;
}

// Windows of up to 3x3 with stride 1 or 2 and no dilation along the row (resnet's 3x3 stride-2
// stem pool, 2x2 pools): the fast path, one call of interior_outputs per output row.
bool has_fast_path(const PoolAxis& h, const PoolAxis& w) {
  return h.kernel <= 3 && (w.kernel == 2 || w.kernel == 3) && (w.stride == 1 || w.stride == 2) && w.dilation == 1;
}

template <typename scalar_t>
void forward_planar_fast(MaxPool2dPlan& p) {
  const PoolAxis h = p.h, w = p.w;
  const int64_t planes = p.batch * p.channels, plane_in = h.in * w.in, plane_out = h.out * w.out;
  const scalar_t* in = p.input.const_data_ptr<scalar_t>();
  scalar_t* out = p.output.mutable_data_ptr<scalar_t>();
  int64_t* indices = p.indices.mutable_data_ptr<int64_t>();
  const InteriorFn<scalar_t> interior[3] = {interior_for<scalar_t, 1>(w.kernel, w.stride),
                                            interior_for<scalar_t, 2>(w.kernel, w.stride),
                                            interior_for<scalar_t, 3>(w.kernel, w.stride)};
  const int64_t lo = outputs_inside(w, 0).first, hi = std::max(lo, outputs_inside(w, w.kernel - 1).second);
  const int64_t shift = -w.padding;
  const int64_t grain = std::max<int64_t>(1, 16384 / plane_in);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* x = in + plane * plane_in;
      for (int64_t oh = 0; oh < h.out; ++oh) {
        const scalar_t* rows[3];
        int32_t row_positions[3];
        int nr = 0;
        for (int64_t kh = 0; kh < h.kernel; ++kh) {
          const int64_t ih = oh * h.stride - h.padding + kh * h.dilation;
          if (ih < 0 || ih >= h.in) continue;
          rows[nr] = x + ih * w.in;
          row_positions[nr++] = static_cast<int32_t>(ih * w.in + shift);
        }
        scalar_t* y = out + plane * plane_out + oh * w.out;
        int64_t* idx = indices + plane * plane_out + oh * w.out;
        for (int64_t ow = 0; ow < std::min(lo, w.out); ++ow) one_output(x, h, w, oh, ow, y + ow, idx + ow);
        interior[nr - 1](rows, row_positions, shift, lo, hi, y, idx);
        for (int64_t ow = std::max(lo, hi); ow < w.out; ++ow) one_output(x, h, w, oh, ow, y + ow, idx + ow);
      }
    }
  });
}

// Any window: for each window position (kh, kw) in torch's order, one loop along the output row
// over the outputs whose position lies inside the input.
template <typename scalar_t>
void forward_planar(MaxPool2dPlan& p) {
  if (has_fast_path(p.h, p.w)) return forward_planar_fast<scalar_t>(p);
  using acc_t = at::opmath_type<scalar_t>;
  const PoolAxis h = p.h, w = p.w;
  const int64_t planes = p.batch * p.channels, plane_in = h.in * w.in, plane_out = h.out * w.out;
  const scalar_t* in = p.input.const_data_ptr<scalar_t>();
  scalar_t* out = p.output.mutable_data_ptr<scalar_t>();
  int64_t* indices = p.indices.mutable_data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> w_ranges(w.kernel);
  for (int64_t kw = 0; kw < w.kernel; ++kw) w_ranges[kw] = outputs_inside(w, kw);
  std::vector<int64_t> w_first(w.out);
  for (int64_t ow = 0; ow < w.out; ++ow) w_first[ow] = first_inside(w, ow);
  const int64_t grain = std::max<int64_t>(1, 16384 / plane_in);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(w.out);
    std::vector<int32_t> best_position(w.out);
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* x = in + plane * plane_in;
      for (int64_t oh = 0; oh < h.out; ++oh) {
        const int64_t ih_first = first_inside(h, oh);
        for (int64_t ow = 0; ow < w.out; ++ow) {
          best[ow] = -std::numeric_limits<acc_t>::infinity();
          best_position[ow] = static_cast<int32_t>(ih_first * w.in + w_first[ow]);
        }
        for (int64_t kh = 0; kh < h.kernel; ++kh) {
          const int64_t ih = oh * h.stride - h.padding + kh * h.dilation;
          if (ih < 0 || ih >= h.in) continue;
          for (int64_t kw = 0; kw < w.kernel; ++kw) {
            const int64_t shift = kw * w.dilation - w.padding;
            const auto [lo, hi] = w_ranges[kw];
            const scalar_t* __restrict__ row = x + ih * w.in;
            const int32_t row_position = static_cast<int32_t>(ih * w.in + shift);
            acc_t* __restrict__ b = best.data();
            int32_t* __restrict__ bp = best_position.data();
            for (int64_t ow = lo; ow < hi; ++ow) {
              keep_larger<acc_t>(static_cast<acc_t>(row[ow * w.stride + shift]),
                                 row_position + static_cast<int32_t>(ow * w.stride), b[ow], bp[ow]);
            }
          }
        }
        scalar_t* y = out + plane * plane_out + oh * w.out;
        int64_t* idx = indices + plane * plane_out + oh * w.out;
        for (int64_t ow = 0; ow < w.out; ++ow) {
          y[ow] = static_cast<scalar_t>(best[ow]);
          idx[ow] = best_position[ow];
        }
      }
    }
  });
}

// Channels-last: a pixel's C values are adjacent, so the window's positions are compared a
// vector of channels at a time. Per output pixel the window positions inside the input are
// listed first (rows[k]: position k's C values, positions[k] its index in the plane, in torch's
// scan order); then each vector of channels runs the whole window with its running maximum and
// position in registers (float32: GCC vector types as wide as the build's registers, lanes::).
// Until 2026-12-07 the maximum lived in a C-value array that every window position loaded and
// stored again: 1.0 ms at resnet's stem pool (16x64x56x56, 3x3 stride 2) on a Xeon with
// AVX-512, as torch's own channels-last kernel, against 0.55 for a copy of the input.
namespace lanes {
#ifndef BATCHOPS_CPU_VECTOR_BYTES
#define BATCHOPS_CPU_VECTOR_BYTES 16  // the baseline build: SSE
#endif
constexpr int64_t kBytes = BATCHOPS_CPU_VECTOR_BYTES;
constexpr int64_t kFloats = kBytes / 4;
using floats = float __attribute__((vector_size(kBytes)));
using ints = int32_t __attribute__((vector_size(kBytes)));
using half_ints = int32_t __attribute__((vector_size(kBytes / 2)));
using longs = int64_t __attribute__((vector_size(kBytes)));  // half a vector of positions, widened

// Lanes [from, from + kFloats / 2) of v, widened to int64.
template <size_t from, size_t... I>
inline longs widen_half(const ints& v, std::index_sequence<I...>) {
  return __builtin_convertvector(half_ints(__builtin_shufflevector(v, v, (I + from)...)), longs);
}
inline longs widen_lower(const ints& v) { return widen_half<0>(v, std::make_index_sequence<kFloats / 2>{}); }
inline longs widen_upper(const ints& v) { return widen_half<kFloats / 2>(v, std::make_index_sequence<kFloats / 2>{}); }

// Channels [c0, c0 + kFloats) of one output pixel (forward_channels_last).
inline void window_max(const float* const* rows, const int32_t* positions, int64_t count, int32_t first, int64_t c0,
                       float* y, int64_t* idx) {
  floats best = -std::numeric_limits<float>::infinity() + floats{};
  ints best_position = first + ints{};
  for (int64_t k = 0; k < count; ++k) {
    const floats v = load_vector<floats>(rows[k] + c0);
    const ints take = (v > best) | (v != v);  // NaN wins, as in torch
    best = take ? v : best;
    best_position = take ? positions[k] + ints{} : best_position;
  }
  store_vector(y + c0, best);
  store_vector(idx + c0, widen_lower(best_position));
  store_vector(idx + c0 + kFloats / 2, widen_upper(best_position));
}

}  // namespace lanes

// The C channels of one output pixel, any dtype: the loop for what lanes:: does not take.
template <typename scalar_t>
inline void window_max_loop(const scalar_t* const* rows, const int32_t* positions, int64_t count, int32_t first,
                            int64_t C, scalar_t* y, int64_t* idx) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int32_t best_position = first;
    for (int64_t k = 0; k < count; ++k) {
      keep_larger<acc_t>(static_cast<acc_t>(rows[k][c]), positions[k], best, best_position);
    }
    y[c] = static_cast<scalar_t>(best);
    idx[c] = best_position;
  }
}

// fn(c0) for vectors of lanes::kFloats channels from c0, the last one ending at C and
// overlapping the one before when C is not a multiple of the width (those channels computed
// twice, to the same values). False, calling nothing, for fewer channels than a vector or
// another dtype than float32.
template <typename scalar_t, typename F>
inline bool for_channel_vectors(int64_t C, F&& fn) {
  if (!std::is_same_v<scalar_t, float> || C < lanes::kFloats) return false;
  int64_t c0 = 0;
  for (; c0 + lanes::kFloats <= C; c0 += lanes::kFloats) fn(c0);
  if (c0 < C) fn(C - lanes::kFloats);
  return true;
}

template <typename scalar_t>
void forward_channels_last(MaxPool2dPlan& p) {
  const PoolAxis h = p.h, w = p.w;
  const int64_t C = p.channels, pixels_out = p.batch * h.out * w.out;
  const scalar_t* in = p.input.const_data_ptr<scalar_t>();
  scalar_t* out = p.output.mutable_data_ptr<scalar_t>();
  int64_t* indices = p.indices.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * h.kernel * w.kernel));
  at::parallel_for(0, pixels_out, grain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> rows(h.kernel * w.kernel);
    std::vector<int32_t> positions(h.kernel * w.kernel);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t n = pixel / (h.out * w.out), oh = pixel / w.out % h.out, ow = pixel % w.out;
      const int32_t first = static_cast<int32_t>(first_inside(h, oh) * w.in + first_inside(w, ow));
      int64_t count = 0;
      for (int64_t kh = 0; kh < h.kernel; ++kh) {
        const int64_t ih = oh * h.stride - h.padding + kh * h.dilation;
        if (ih < 0 || ih >= h.in) continue;
        for (int64_t kw = 0; kw < w.kernel; ++kw) {
          const int64_t iw = ow * w.stride - w.padding + kw * w.dilation;
          if (iw < 0 || iw >= w.in) continue;
          const int64_t position = ih * w.in + iw;
          rows[count] = in + (n * h.in * w.in + position) * C;
          positions[count++] = static_cast<int32_t>(position);
        }
      }
      scalar_t* y = out + pixel * C;
      int64_t* idx = indices + pixel * C;
      const bool vectors = for_channel_vectors<scalar_t>(C, [&](int64_t c0) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          lanes::window_max(rows.data(), positions.data(), count, first, c0, y, idx);
        }
      });
      if (!vectors) window_max_loop(rows.data(), positions.data(), count, first, C, y, idx);
    }
  });
}

// The channels-last backward on AVX-512 as a gather: each input value's gradient is the sum of
// grad_output over the outputs whose window holds it and whose index names it, 16 channels at a
// time (a masked add per output), added in torch's order: ascending output, from zero, the same
// bits as the scatter (cpu.cpp) and torch's, which add each output's gradient at its index
// (lanes an output does not name keep their sum, as adding +0 would: a sum from +0 is never -0).
// No zero fill and no scattered read-modify-write of 4-byte values. Other builds scatter: GCC's
// generic vectors made the int64 comparisons' masks into vectors and back (1.1 ms at resnet's
// stem pool on a Xeon, the scatter 0.76, torch's 0.95).
struct AxisWindows {
  int64_t most;                  // outputs holding one input at most: one per window position
  std::vector<int64_t> outputs;  // [i * most + j]: the j-th output (ascending) holding input i
  std::vector<int64_t> counts;   // [i]: how many
  explicit AxisWindows(const PoolAxis& a)
      : most(std::min(a.kernel, a.out)), outputs(a.in * most), counts(a.in, 0) {
    for (int64_t i = 0; i < a.in; ++i) {
      for (int64_t k = a.kernel - 1; k >= 0; --k) {  // descending k: ascending outputs
        const int64_t at = i + a.padding - k * a.dilation;
        if (at < 0 || at % a.stride != 0 || at / a.stride >= a.out) continue;
        outputs[i * most + counts[i]++] = at / a.stride;
      }
    }
  }
  int64_t output(int64_t i, int64_t j) const { return outputs[i * most + j]; }
};

// max_pool2d_batch_norm_backward's pass, g = alpha * g + beta * (x - center) + gamma per
// channel, applied where g is made: to a plane or an image just scattered (cpu.cpp), or in
// registers after the AVX-512 gather (gather16). Off (x null) for max_pool2d_backward.
template <typename scalar_t>
struct BatchNormPass {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;  // the input, laid out as grad_input
  const acc_t *alpha = nullptr, *beta = nullptr, *center = nullptr, *gamma = nullptr;
  explicit BatchNormPass(const MaxPool2dPlan& p) {
    if (!p.bn_coefficients.defined()) return;
    x = p.bn_input.const_data_ptr<scalar_t>();
    alpha = p.bn_coefficients.const_data_ptr<acc_t>();
    beta = alpha + p.channels, center = beta + p.channels, gamma = center + p.channels;
  }
  // n values of channel c from `at` (planar).
  void planar(scalar_t* g, int64_t at, int64_t n, int64_t c) const {
    const acc_t a = alpha[c], b = beta[c], m = center[c], k = gamma[c];
    const scalar_t* xs = x + at;
    for (int64_t i = 0; i < n; ++i) g[i] = static_cast<scalar_t>(a * acc_t(g[i]) + (b * (acc_t(xs[i]) - m) + k));
  }
  // `pixels` rows of C channels from `at` (channels-last).
  void rows(scalar_t* g, int64_t at, int64_t pixels, int64_t C) const {
    for (int64_t r = 0; r < pixels; ++r) {
      scalar_t* gr = g + r * C;
      const scalar_t* xr = x + at + r * C;
      for (int64_t c = 0; c < C; ++c) {
        gr[c] = static_cast<scalar_t>(alpha[c] * acc_t(gr[c]) + (beta[c] * (acc_t(xr[c]) - center[c]) + gamma[c]));
      }
    }
  }
};

#if BATCHOPS_CPU_VARIANT_AVX512
// Channels [c0, c0 + 16) of one input pixel from the `count` outputs holding it; adds to
// `matched` one per lane in `fresh` (the lanes not computed before) and output naming it.
// `x` (with bn.x set): this pixel's input values.
inline void gather16(const float* const* dy, const int64_t* const* idx, int64_t count, int64_t position, int64_t c0,
                     __mmask16 fresh, float* gi, __m512i& matched, const BatchNormPass<float>& bn, const float* x) {
  const __m512i at = _mm512_set1_epi64(position);
  const __m512i one = _mm512_set1_epi32(1);
  __m512 g = _mm512_setzero_ps();
  for (int64_t k = 0; k < count; ++k) {
    const __mmask8 lower = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512(idx[k] + c0), at);
    const __mmask8 upper = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512(idx[k] + c0 + 8), at);
    const __mmask16 hit = _mm512_kunpackb(upper, lower);
    g = _mm512_mask_add_ps(g, hit, g, _mm512_loadu_ps(dy[k] + c0));
    matched = _mm512_mask_add_epi32(matched, hit & fresh, matched, one);
  }
  if (bn.x) {
    const __m512 centered = _mm512_sub_ps(_mm512_loadu_ps(x + c0), _mm512_loadu_ps(bn.center + c0));
    const __m512 bx = _mm512_fmadd_ps(_mm512_loadu_ps(bn.beta + c0), centered, _mm512_loadu_ps(bn.gamma + c0));
    g = _mm512_fmadd_ps(_mm512_loadu_ps(bn.alpha + c0), g, bx);
  }
  _mm512_storeu_ps(gi + c0, g);
}

// True when every output's index lay in its window (each then matched once); false, with
// grad_input incomplete, otherwise (indices not from the forward): the caller scatters then,
// as torch does with any index.
inline bool gather_channels_last(MaxPool2dPlan& p) {
  const PoolAxis h = p.h, w = p.w;
  const int64_t C = p.channels;
  const float* go = p.grad_output.const_data_ptr<float>();
  const int64_t* indices = p.indices.const_data_ptr<int64_t>();
  float* gi = p.grad_input.mutable_data_ptr<float>();
  const BatchNormPass<float> bn(p);
  const AxisWindows along_h(h), along_w(w);
  // The last 16 channels again, overlapping, where C is not a multiple of 16; only the lanes not
  // computed before count.
  const int64_t tail = C % 16;
  const __mmask16 fresh_in_tail = static_cast<__mmask16>(0xFFFF << (16 - tail));
  std::atomic<int64_t> matched{0};
  // Tasks take input rows (n, ih); lane counts are int32, added up after each row (a row's
  // matches are at most the C x w.out x kernel_h outputs of the rows holding it).
  at::parallel_for(0, p.batch * h.in, std::max<int64_t>(1, 16384 / (C * w.in)), [&](int64_t begin, int64_t end) {
    std::vector<const float*> dy(along_h.most * along_w.most);
    std::vector<const int64_t*> idx(along_h.most * along_w.most);
    int64_t found = 0;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / h.in, ih = row % h.in;
      __m512i found_in_lanes = _mm512_setzero_si512();
      for (int64_t iw = 0; iw < w.in; ++iw) {
        int64_t count = 0;
        for (int64_t j = 0; j < along_h.counts[ih]; ++j) {
          const int64_t out_row = (n * h.out + along_h.output(ih, j)) * w.out;
          for (int64_t i = 0; i < along_w.counts[iw]; ++i) {
            const int64_t at = (out_row + along_w.output(iw, i)) * C;
            dy[count] = go + at;
            idx[count++] = indices + at;
          }
        }
        const int64_t position = ih * w.in + iw, at = (row * w.in + iw) * C;
        float* g = gi + at;
        const float* x = bn.x ? bn.x + at : nullptr;
        for (int64_t c0 = 0; c0 + 16 <= C; c0 += 16) {
          gather16(dy.data(), idx.data(), count, position, c0, 0xFFFF, g, found_in_lanes, bn, x);
        }
        if (tail) gather16(dy.data(), idx.data(), count, position, C - 16, fresh_in_tail, g, found_in_lanes, bn, x);
      }
      found += _mm512_reduce_add_epi32(found_in_lanes);
    }
    matched += found;
  });
  return matched.load() == p.batch * h.out * w.out * C;
}
#endif

}  // namespace

// Fills p.output and p.indices.
void max_pool2d_forward(MaxPool2dPlan& p) {
  BATCHOPS_CPU_DISPATCH_DTYPES(p.input.scalar_type(), "batchops_max_pool2d_cpu", [&] {
    p.channels_last ? forward_channels_last<scalar_t>(p) : forward_planar<scalar_t>(p);
  });
}

// The channels-last backward's gather (AVX-512, float32, 16 channels or more): fills
// p.grad_input (with max_pool2d_batch_norm_backward's pass applied where p.bn_coefficients is
// set) and returns true, or returns false (the caller scatters) where it does not run or
// meets an index outside its output's window.
bool max_pool2d_backward_channels_last(MaxPool2dPlan& p) {
#if BATCHOPS_CPU_VARIANT_AVX512
  if (p.grad_output.scalar_type() == at::kFloat && p.channels >= 16) return gather_channels_last(p);
#endif
  return false;
}

}  // namespace BATCHOPS_CPU_NS
}  // namespace batchops
