// The max pool forward on the CPU, compiled once per instruction set (cpu.cpp, cpu_avx2.cpp,
// cpu_avx512.cpp), each time inside its own namespace BATCHOPS_CPU_NS; cpu.cpp picks one at run
// time (common/cpu_isa.h). How it walks the windows, and why: csrc/README.md "Max pool".
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
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
      keep_larger<acc_t>(static_cast<acc_t>(x[ih * w.in + iw]), static_cast<int32_t>(ih * w.in + iw), best, best_position);
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
namespace vec16 {
using floats = float __attribute__((vector_size(64)));
using ints = int32_t __attribute__((vector_size(64)));
using longs = int64_t __attribute__((vector_size(128)));

inline floats load(const float* p) {
  floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

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
  std::memcpy(y + ow0, &best, sizeof(best));
  const longs wide = __builtin_convertvector(best_position, longs);
  std::memcpy(idx + ow0, &wide, sizeof(wide));
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

template <typename scalar_t>
void forward_channels_last(MaxPool2dPlan& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const PoolAxis h = p.h, w = p.w;
  const int64_t C = p.channels, pixels_out = p.batch * h.out * w.out;
  const scalar_t* in = p.input.const_data_ptr<scalar_t>();
  scalar_t* out = p.output.mutable_data_ptr<scalar_t>();
  int64_t* indices = p.indices.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * h.kernel * w.kernel));
  at::parallel_for(0, pixels_out, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(C);
    std::vector<int32_t> best_position(C);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t n = pixel / (h.out * w.out), oh = pixel / w.out % h.out, ow = pixel % w.out;
      const int64_t first = first_inside(h, oh) * w.in + first_inside(w, ow);
      std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(best_position.begin(), best_position.end(), static_cast<int32_t>(first));
      acc_t* __restrict__ b = best.data();
      int32_t* __restrict__ bp = best_position.data();
      for (int64_t kh = 0; kh < h.kernel; ++kh) {
        const int64_t ih = oh * h.stride - h.padding + kh * h.dilation;
        if (ih < 0 || ih >= h.in) continue;
        for (int64_t kw = 0; kw < w.kernel; ++kw) {
          const int64_t iw = ow * w.stride - w.padding + kw * w.dilation;
          if (iw < 0 || iw >= w.in) continue;
          const int64_t position = ih * w.in + iw;
          const scalar_t* __restrict__ row = in + (n * h.in * w.in + position) * C;
          for (int64_t c = 0; c < C; ++c) keep_larger<acc_t>(row[c], static_cast<int32_t>(position), b[c], bp[c]);
        }
      }
      scalar_t* y = out + pixel * C;
      int64_t* idx = indices + pixel * C;
      for (int64_t c = 0; c < C; ++c) {
        y[c] = static_cast<scalar_t>(b[c]);
        idx[c] = bp[c];
      }
    }
  });
}

}  // namespace

// Fills p.output and p.indices.
void max_pool2d_forward(MaxPool2dPlan& p) {
  BATCHOPS_CPU_DISPATCH_DTYPES(p.input.scalar_type(), "batchops_max_pool2d_cpu", [&] {
    p.channels_last ? forward_channels_last<scalar_t>(p) : forward_planar<scalar_t>(p);
  });
}

}  // namespace BATCHOPS_CPU_NS
}  // namespace batchops
