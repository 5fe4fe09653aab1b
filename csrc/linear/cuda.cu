// Linear layers on CUDA.
//
// What runs where, and why:
// * Dense products (linear, and the backward's two products) and uniform groups (bmm) go to
//   cuBLAS through ATen. On these regular shapes cuBLAS is the fastest code there is for every
//   dtype, and a hand-written tiled kernel cannot match its Hopper kernels without wgmma/TMA
//   (arch "9.0a"), which would also put CUTLASS-sized compile times on CI's two cores. Our part
//   is the epilogue around the product: one pass for bias + activation (relu with a bias goes
//   to cuBLASLt's own bias+ReLU epilogue via at::_addmm_activation, one kernel in all), and in
//   backward one pass for the activation's derivative that also produces the bias gradient.
// * Ragged groups (mixture-of-experts routing) have no cuBLAS call: grouped_gemm_kernel below
//   covers every group in one launch, with the bias + activation fused into its epilogue.
//   float16 / bfloat16 use tensor cores (WMMA, float32 accumulation); float32 / float64 use a
//   register-tiled SIMT loop. The tile schedule is computed on the device from group_sizes
//   (prefix sums), so nothing synchronises with the host; group sizes that live on the GPU
//   are validated there with a device-side assert.
//
// Bias gradients are summed over fixed row chunks, and the chunks merged in order: results
// are bitwise reproducible (no float atomics).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_addmm_activation.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "common/cuda_launch.h"
#include "linear/entry_points.h"
#include "linear/linear.h"

namespace batchops {
namespace {

// ---------------------------------------------------------------------------------------
// Activation chosen at run time inside kernels whose main cost is elsewhere (the GEMM).

// act(v), and act'(v) into `derivative` (what forward saves for silu / gelu*, see linear.h).
template <typename acc_t>
__device__ __forceinline__ acc_t apply_activation_with_derivative(Activation act, acc_t v, acc_t& derivative) {
  switch (act) {
    case Activation::kReLU:
      return activation_forward_with_derivative<Activation::kReLU>(v, derivative);
    case Activation::kSiLU:
      return activation_forward_with_derivative<Activation::kSiLU>(v, derivative);
    case Activation::kGELU:
      return activation_forward_with_derivative<Activation::kGELU>(v, derivative);
    case Activation::kGELUTanh:
      return activation_forward_with_derivative<Activation::kGELUTanh>(v, derivative);
    case Activation::kHardswish:
      return activation_forward_with_derivative<Activation::kHardswish>(v, derivative);
    case Activation::kReLU6:
      return activation_forward_with_derivative<Activation::kReLU6>(v, derivative);
    default:
      return activation_forward_with_derivative<Activation::kNone>(v, derivative);
  }
}

// act(v) alone: the derivative is dead code once inlined, as in activation_forward.
template <typename acc_t>
__device__ __forceinline__ acc_t apply_activation(Activation act, acc_t v) {
  acc_t unused_derivative;
  return apply_activation_with_derivative(act, v, unused_derivative);
}

// Index of the group whose [prefix[g], prefix[g + 1]) holds `item` (prefix has G + 1 entries,
// non-decreasing); G when item is past the end.
__device__ __forceinline__ int find_group(const int64_t* prefix, int G, int64_t item) {
  if (item >= prefix[G]) return G;
  int lo = 0, hi = G;  // prefix[lo] <= item < prefix[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid] <= item) lo = mid; else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------
// Forward epilogue after a cuBLAS product: y = act(z + bias[row / rows_per_group]). When z is
// not y (silu / gelu* with autograd), z is then overwritten with the derivative (saved).

template <typename scalar_t, Activation A>
__global__ void forward_epilogue_kernel(scalar_t* z, scalar_t* y, const scalar_t* __restrict__ bias, int64_t total,
                                        int64_t N, int64_t rows_per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = index_div(i, N);
    const int64_t col = i - row * N;
    const acc_t b = bias != nullptr ? acc_t(bias[index_div(row, rows_per_group) * N + col]) : acc_t(0);
    if (activation_saves_derivative(A) && z != y) {
      acc_t derivative;
      y[i] = scalar_t(linear_epilogue_saving_derivative<A, acc_t>(acc_t(z[i]), b, derivative));
      z[i] = scalar_t(derivative);
    } else {
      y[i] = scalar_t(linear_epilogue<A, acc_t>(acc_t(z[i]), b));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward epilogue: dz = dy * act'(from saved) over row chunks that never cross a group,
// with each chunk's column sums of dz (the bias gradient's partials) written to
// partial[chunk]. Block: 32 columns x 8 row lanes; grid: x = chunks (upper bound), y = columns.

constexpr int kChunkRows = 256;
constexpr int kColsPerBlock = 32;
constexpr int kRowLanes = 8;

template <typename scalar_t, Activation A>
__global__ void backward_epilogue_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ saved,
                                         scalar_t* __restrict__ dz,
                                         at::opmath_type<scalar_t>* __restrict__ partial,
                                         const int64_t* __restrict__ offsets,
                                         const int64_t* __restrict__ chunk_prefix, int G, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kRowLanes][kColsPerBlock];
  const int64_t chunk = blockIdx.x;
  const int g = find_group(chunk_prefix, G, chunk);
  if (g >= G) return;
  const int64_t r0 = offsets[g] + (chunk - chunk_prefix[g]) * kChunkRows;
  const int64_t r1 = min(r0 + kChunkRows, offsets[g + 1]);
  const int64_t col = int64_t(blockIdx.y) * kColsPerBlock + threadIdx.x;
  acc_t acc = acc_t(0);
  if (col < N) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const int64_t i = r * N + col;
      const acc_t grad = acc_t(dy[i]) * linear_grad_factor<A, acc_t>(acc_t(saved[i]));
      if (dz != nullptr) dz[i] = scalar_t(grad);
      acc += grad;
    }
  }
  if (partial == nullptr) return;
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    acc_t total = acc_t(0);
    for (int lane = 0; lane < kRowLanes; ++lane) total += sums[lane][threadIdx.x];  // fixed order
    partial[chunk * N + col] = total;
  }
}

// grad_bias[g, col] = sum of partial[chunk, col] over g's chunks, in chunk order.
template <typename scalar_t, typename acc_t>
// Groups stride over gridDim.y (at most 65535), so any number of groups works.
__global__ void reduce_bias_kernel(const acc_t* __restrict__ partial, const int64_t* __restrict__ chunk_prefix,
                                   scalar_t* __restrict__ grad_bias, int64_t G, int64_t N) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= N) return;
  for (int64_t g = blockIdx.y; g < G; g += gridDim.y) {
    acc_t total = acc_t(0);
    for (int64_t c = chunk_prefix[g]; c < chunk_prefix[g + 1]; ++c) total += partial[c * N + col];
    grad_bias[g * N + col] = scalar_t(total);
  }
}

// ---------------------------------------------------------------------------------------
// The grouped GEMM: C_g = epilogue(A_g B_g) for every group in one launch.
//
// Two shapes of raggedness:
// * kRaggedRows (forward, grad_input): group g owns rows [offsets[g], offsets[g + 1]) of A and C;
//   B_g is the group's weight. Row tiles of all groups are numbered consecutively
//   (tile_prefix = prefix sums of ceil(rows_g / kTileM)) and each block finds its group.
// * kRaggedReduction (grad_weight): C_g = dz_g^T x_g, a fixed (N, K) output per group, reduced
//   over the group's rows; blocks are numbered group by group.
// Element (m, k) of A_g is A[base + m * a_m + k * a_k], element (k, n) of B_g is
// B[base + k * b_k + n * b_n], so one kernel serves forward and both backward products.

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kGemmThreads = 128;
constexpr int kPad = 8;  // smem row padding (elements): staggers banks for the fragment loads

enum class GemmMode : int { kRaggedRows = 0, kRaggedReduction = 1 };

template <typename scalar_t>
struct GemmArgs {
  const scalar_t* A;
  const scalar_t* B;
  scalar_t* C;
  scalar_t* C_saved;      // forward: act'(product + bias) for silu / gelu* backward; else null
  const scalar_t* bias;   // (G, n_cols) or null
  const int64_t* offsets;      // G + 1 row offsets
  const int64_t* tile_prefix;  // kRaggedRows: G + 1 prefix sums of row tiles
  int G;
  int64_t m_fixed;    // kRaggedReduction: rows of C_g
  int64_t k_fixed;    // kRaggedRows: the reduction length
  int64_t n_cols;     // columns of C_g
  int64_t a_m, a_k, b_k, b_n, b_group, ldc;
  Activation act;
};

// Tensor cores for 16-bit types where the architecture has them (bf16 WMMA needs sm_80).
template <typename scalar_t>
struct WmmaType {
  using type = void;
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
__device__ constexpr bool use_tensor_cores() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  return std::is_same_v<scalar_t, at::Half>;
#else
  return false;
#endif
}

// Loads a kTileM x kTileK tile of a matrix whose element (r, k) is at src[r * s_r + k * s_k],
// rows < rows_valid and k < k_valid (zeros elsewhere), into smem as [r][k]. The faster-moving
// index follows the unit stride, so global reads coalesce for either orientation.
template <typename scalar_t>
__device__ __forceinline__ void load_tile(scalar_t (*dst)[kTileK + kPad], const scalar_t* src, int64_t s_r,
                                          int64_t s_k, int64_t rows_valid, int64_t k_valid) {
  const bool k_fast = s_k == 1;
  for (int e = threadIdx.x; e < kTileM * kTileK; e += kGemmThreads) {
    const int r = k_fast ? e / kTileK : e % kTileM;
    const int k = k_fast ? e % kTileK : e / kTileM;
    scalar_t v = scalar_t(0);
    if (r < rows_valid && k < k_valid) v = src[int64_t(r) * s_r + int64_t(k) * s_k];
    dst[r][k] = v;
  }
}

template <typename scalar_t, GemmMode kMode>
__global__ void __launch_bounds__(kGemmThreads) grouped_gemm_kernel(GemmArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  // Operand tiles while multiplying, then the accumulator tile for the epilogue.
  constexpr int kOperandBytes = 2 * kTileM * (kTileK + kPad) * int(sizeof(scalar_t));
  constexpr int kAccBytes = kTileM * (kTileN + 4) * int(sizeof(acc_t));
  __shared__ __align__(32) unsigned char smem[kOperandBytes > kAccBytes ? kOperandBytes : kAccBytes];
  auto As = reinterpret_cast<scalar_t(*)[kTileK + kPad]>(smem);
  auto Bs = reinterpret_cast<scalar_t(*)[kTileK + kPad]>(smem + kTileM * (kTileK + kPad) * sizeof(scalar_t));
  auto Cs = reinterpret_cast<acc_t(*)[kTileN + 4]>(smem);

  // Which group and tile this block computes, and where that group's operands start.
  const int64_t n_tiles = (args.n_cols + kTileN - 1) / kTileN;
  int g;
  int64_t m0, rows_g, k_len;
  const scalar_t *A, *B;
  scalar_t *C, *C_saved = nullptr;
  const int64_t n0 = (int64_t(blockIdx.x) % n_tiles) * kTileN;
  const int64_t tile = int64_t(blockIdx.x) / n_tiles;
  if constexpr (kMode == GemmMode::kRaggedRows) {
    g = find_group(args.tile_prefix, args.G, tile);
    if (g >= args.G) return;
    const int64_t row0 = args.offsets[g];
    rows_g = args.offsets[g + 1] - row0;
    m0 = (tile - args.tile_prefix[g]) * kTileM;
    k_len = args.k_fixed;
    A = args.A + row0 * args.a_m;
    B = args.B + int64_t(g) * args.b_group;
    C = args.C + row0 * args.ldc;
    if (args.C_saved != nullptr) C_saved = args.C_saved + row0 * args.ldc;
  } else {
    const int64_t m_tiles = (args.m_fixed + kTileM - 1) / kTileM;
    g = int(tile / m_tiles);
    if (g >= args.G) return;
    m0 = (tile % m_tiles) * kTileM;
    rows_g = args.m_fixed;
    const int64_t row0 = args.offsets[g];
    k_len = args.offsets[g + 1] - row0;
    A = args.A + row0 * args.a_k;
    B = args.B + row0 * args.b_k;
    C = args.C + int64_t(g) * args.m_fixed * args.ldc;
  }
  const int64_t m_valid = rows_g - m0;
  const int64_t n_valid = args.n_cols - n0;

  if constexpr (use_tensor_cores<scalar_t>()) {
    using namespace nvcuda;
    using wmma_t = typename WmmaType<scalar_t>::type;
    // 4 warps in 2 x 2, each a 32 x 32 sub-tile of 2 x 2 fragments of 16 x 16.
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < k_len; k0 += kTileK) {
      load_tile(As, A + m0 * args.a_m + k0 * args.a_k, args.a_m, args.a_k, m_valid, k_len - k0);
      load_tile(Bs, B + n0 * args.b_n + k0 * args.b_k, args.b_n, args.b_k, n_valid, k_len - k0);
      __syncthreads();
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, wmma_t, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, wmma_t, wmma::col_major> b[2];
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a[i], reinterpret_cast<const wmma_t*>(&As[wm + 16 * i][kk]), kTileK + kPad);
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(b[j], reinterpret_cast<const wmma_t*>(&Bs[wn + 16 * j][kk]), kTileK + kPad);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], acc[i][j], kTileN + 4, wmma::mem_row_major);
    __syncthreads();
  } else {
    // SIMT: 16 x 8 threads, each an 4 x 8 block of outputs (rows ty + 16 i, columns tx + 8 j:
    // strided so neighbouring threads read neighbouring smem words).
    const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
    acc_t acc[4][8];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);
    for (int64_t k0 = 0; k0 < k_len; k0 += kTileK) {
      load_tile(As, A + m0 * args.a_m + k0 * args.a_k, args.a_m, args.a_k, m_valid, k_len - k0);
      load_tile(Bs, B + n0 * args.b_n + k0 * args.b_k, args.b_n, args.b_k, n_valid, k_len - k0);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t a[4], b[8];
        for (int i = 0; i < 4; ++i) a[i] = acc_t(As[ty + 16 * i][kk]);
        for (int j = 0; j < 8; ++j) b[j] = acc_t(Bs[tx + 8 * j][kk]);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) Cs[ty + 16 * i][tx + 8 * j] = acc[i][j];
    __syncthreads();
  }

  // Epilogue: bias, activation (and its derivative, saved); stores coalesced along the columns.
  for (int e = threadIdx.x; e < kTileM * kTileN; e += kGemmThreads) {
    const int r = e / kTileN, c = e % kTileN;
    if (r >= m_valid || c >= n_valid) continue;
    acc_t v = Cs[r][c];
    const int64_t out = (m0 + r) * args.ldc + n0 + c;
    if (args.bias != nullptr) v += acc_t(args.bias[int64_t(g) * args.n_cols + n0 + c]);
    // As F.linear then the activation in half precision: product + bias rounded once to the
    // output dtype before an activation whose derivative jumps (relu at 0, hardswish at -3 and
    // 3, relu6 at 0 and 6), so that a value within a rounding of a jump takes torch's side (the
    // CPU path does too).
    if (!std::is_same_v<scalar_t, acc_t> && activation_derivative_jumps(args.act)) v = acc_t(scalar_t(v));
    if (C_saved != nullptr) {
      acc_t derivative;
      C[out] = scalar_t(apply_activation_with_derivative(args.act, v, derivative));
      C_saved[out] = scalar_t(derivative);
    } else {
      C[out] = scalar_t(apply_activation(args.act, v));
    }
  }
}

template <typename scalar_t, GemmMode kMode>
void launch_grouped_gemm(const GemmArgs<scalar_t>& args, int64_t row_tiles_bound) {
  const int64_t n_tiles = (args.n_cols + kTileN - 1) / kTileN;
  const int64_t blocks = row_tiles_bound * n_tiles;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "batchops.grouped_linear: problem too large (", blocks, " tiles)");
  grouped_gemm_kernel<scalar_t, kMode>
      <<<static_cast<unsigned>(blocks), kGemmThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------
// Host side

// Prefix sums of ceil(rows_g / per) over the groups: a tile / chunk schedule, from the
// groups' row offsets (plan_group_offsets).
at::Tensor tile_prefix(const at::Tensor& offsets, int64_t G, int64_t per) {
  const at::Tensor sizes = offsets.narrow(0, 1, G).sub(offsets.narrow(0, 0, G));
  return at::cat({at::zeros({1}, offsets.options()), sizes.add(per - 1).div(per, "floor").cumsum(0)});
}

// The epilogue passes: up to 8 blocks of 256 threads per SM, grid-stride beyond.
unsigned elementwise_blocks(int64_t total) { return grid_stride_blocks(total, 256, 8); }

std::tuple<at::Tensor, at::Tensor> forward_cuda(LinearPlan& p) {
  const auto opts = p.x.options();
  const bool save_derivative = plan_saves_derivative(p);
  const std::optional<at::Tensor> bias = p.bias.defined() ? std::optional<at::Tensor>(p.bias) : std::nullopt;
  if (p.mode == LinearMode::kDense && p.act == Activation::kNone) {
    return {linear_shaped(at::linear(p.x, p.weight, bias), p.out_sizes), at::empty({0}, opts)};
  }
  if (p.mode == LinearMode::kDense && p.act == Activation::kReLU && bias.has_value()) {
    // cuBLASLt's bias + ReLU epilogue: product, bias and activation in one kernel.
    return {linear_shaped(at::_addmm_activation(p.bias, p.x, p.weight.t(), 1, 1, /*use_gelu=*/false), p.out_sizes),
            at::empty({0}, opts)};
  }
  at::Tensor y = at::empty({p.rows, p.N}, opts);
  at::Tensor saved = save_derivative ? at::empty({p.rows, p.N}, opts) : at::Tensor();
  if (p.rows == 0 || p.N == 0) {
    return {linear_shaped(y, p.out_sizes), save_derivative ? linear_shaped(saved, p.out_sizes) : at::empty({0}, opts)};
  }

  if (p.mode == LinearMode::kRagged) {
    const at::Tensor& offsets = plan_group_offsets(p);
    const at::Tensor tiles = tile_prefix(offsets, p.G, kTileM);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "batchops.grouped_linear", [&] {
      GemmArgs<scalar_t> a{};
      a.A = p.x.const_data_ptr<scalar_t>();
      a.B = p.weight.const_data_ptr<scalar_t>();
      a.C = y.mutable_data_ptr<scalar_t>();
      a.C_saved = save_derivative ? saved.mutable_data_ptr<scalar_t>() : nullptr;
      a.bias = ptr_or_null<scalar_t>(p.bias);
      a.offsets = offsets.const_data_ptr<int64_t>();
      a.tile_prefix = tiles.const_data_ptr<int64_t>();
      a.G = static_cast<int>(p.G);
      a.k_fixed = p.K;
      a.n_cols = p.N;
      a.a_m = p.K, a.a_k = 1;                      // x[row][k]
      a.b_k = 1, a.b_n = p.K, a.b_group = p.N * p.K;  // W[g][n][k]
      a.ldc = p.N;
      a.act = p.act;
      launch_grouped_gemm<scalar_t, GemmMode::kRaggedRows>(a, (p.rows + kTileM - 1) / kTileM + p.G);
    });
  } else {
    // cuBLAS product, then one epilogue pass (in place for relu / None; silu / gelu* /
    // hardswish / relu6 write their derivative over the product). relu, hardswish, relu6 and None have their
    // bias in the cuBLAS call (beta = 1), rounded once with the product as in F.linear: in half
    // precision, rounding x W^T before adding the bias would flip relu's mask wherever x W^T + b
    // is within a rounding of 0 (hardswish's derivative jumps at -3 and 3, relu6's at 0 and 6).
    const bool bias_in_product =
        p.bias.defined() && (!activation_saves_derivative(p.act) || activation_derivative_jumps(p.act));
    at::Tensor z = save_derivative ? saved : y;
    linear_product_out(p, z, bias_in_product);
    if (p.act == Activation::kNone) {
      return {linear_shaped(y, p.out_sizes), at::empty({0}, opts)};
    }
    const at::Tensor epilogue_bias = bias_in_product ? at::Tensor() : p.bias;
    const int64_t total = p.rows * p.N;
    const int64_t rows_per_group = p.mode == LinearMode::kDense ? p.rows : p.rows / p.G;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "batchops.linear", [&] {
      BATCHOPS_DISPATCH_ACTIVATION(p.act, [&] {
        forward_epilogue_kernel<scalar_t, kAct><<<elementwise_blocks(total), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
            z.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(epilogue_bias), total,
            p.N, rows_per_group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {linear_shaped(y, p.out_sizes), save_derivative ? linear_shaped(saved, p.out_sizes) : at::empty({0}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(LinearBackwardPlan& b) {
  LinearPlan& p = b.fwd;
  const auto opts = p.x.options();
  const bool need_dz = p.act != Activation::kNone;
  const bool any_product = b.mask[0] || b.mask[1];
  const at::Tensor& dy = b.grad_output;
  at::Tensor dz = need_dz && any_product ? at::empty({p.rows, p.N}, opts) : dy;
  const at::Tensor& offsets = plan_group_offsets(p);

  at::Tensor grad_bias;
  if ((need_dz && any_product) || b.mask[2]) {
    const at::Tensor chunks = tile_prefix(offsets, p.G, kChunkRows);
    const int64_t max_chunks = (p.rows + kChunkRows - 1) / kChunkRows + p.G;
    const auto acc = p.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor partial = b.mask[2] ? at::empty({max_chunks, p.N}, opts.dtype(acc)) : at::Tensor();
    if (b.mask[2]) grad_bias = at::empty(p.bias.sizes(), p.bias.options());
    const at::Tensor& saved = b.saved.defined() ? b.saved : dy;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "batchops.linear_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto stream = at::cuda::getCurrentCUDAStream();
      const int64_t col_blocks = (p.N + kColsPerBlock - 1) / kColsPerBlock;
      if (max_chunks > 0 && col_blocks > 0) {
        TORCH_CHECK(col_blocks < 65536, "batchops.linear_backward: out_features too large (", p.N, ")");
        BATCHOPS_DISPATCH_ACTIVATION(p.act, [&] {
          backward_epilogue_kernel<scalar_t, kAct>
              <<<dim3(static_cast<unsigned>(max_chunks), static_cast<unsigned>(col_blocks)),
                 dim3(kColsPerBlock, kRowLanes), 0, stream>>>(
                  dy.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(),
                  need_dz && any_product ? dz.mutable_data_ptr<scalar_t>() : nullptr,
                  b.mask[2] ? partial.mutable_data_ptr<acc_t>() : nullptr, offsets.const_data_ptr<int64_t>(),
                  chunks.const_data_ptr<int64_t>(), static_cast<int>(p.G), p.N);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      if (b.mask[2] && p.G > 0 && p.N > 0) {
        reduce_bias_kernel<scalar_t, acc_t>
            <<<dim3(static_cast<unsigned>((p.N + 255) / 256), static_cast<unsigned>(std::min<int64_t>(p.G, 65535))),
               256, 0, stream>>>(partial.const_data_ptr<acc_t>(), chunks.const_data_ptr<int64_t>(),
                                 grad_bias.mutable_data_ptr<scalar_t>(), p.G, p.N);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  at::Tensor grad_input, grad_weight;
  if (b.mask[0]) grad_input = at::empty({p.rows, p.K}, opts);
  if (b.mask[1]) grad_weight = at::empty(p.weight.sizes(), opts);
  if (p.mode != LinearMode::kRagged) {
    linear_backward_products_out(p, dz, grad_input, grad_weight);
  } else {
    const at::Tensor tiles = tile_prefix(offsets, p.G, kTileM);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "batchops.grouped_linear_backward",
                                    [&] {
      if (b.mask[0] && p.rows > 0 && p.K > 0) {
        // grad_input[rows of g] = dz_g W_g: element (k = n, col = j) of B_g is W[g][n][j].
        GemmArgs<scalar_t> a{};
        a.A = dz.const_data_ptr<scalar_t>();
        a.B = p.weight.const_data_ptr<scalar_t>();
        a.C = grad_input.mutable_data_ptr<scalar_t>();
        a.offsets = offsets.const_data_ptr<int64_t>();
        a.tile_prefix = tiles.const_data_ptr<int64_t>();
        a.G = static_cast<int>(p.G);
        a.k_fixed = p.N;
        a.n_cols = p.K;
        a.a_m = p.N, a.a_k = 1;
        a.b_k = p.K, a.b_n = 1, a.b_group = p.N * p.K;
        a.ldc = p.K;
        a.act = Activation::kNone;
        launch_grouped_gemm<scalar_t, GemmMode::kRaggedRows>(a, (p.rows + kTileM - 1) / kTileM + p.G);
      }
      if (b.mask[1] && p.N > 0 && p.K > 0) {
        // grad_weight[g] = dz_g^T x_g: A_g(m = n, k = row) = dz[row][n], B_g(k = row, col = j) = x[row][j].
        GemmArgs<scalar_t> a{};
        a.A = dz.const_data_ptr<scalar_t>();
        a.B = p.x.const_data_ptr<scalar_t>();
        a.C = grad_weight.mutable_data_ptr<scalar_t>();
        a.offsets = offsets.const_data_ptr<int64_t>();
        a.G = static_cast<int>(p.G);
        a.m_fixed = p.N;
        a.n_cols = p.K;
        a.a_m = 1, a.a_k = p.N;
        a.b_k = p.K, a.b_n = 1;
        a.ldc = p.K;
        a.act = Activation::kNone;
        launch_grouped_gemm<scalar_t, GemmMode::kRaggedReduction>(a, ((p.N + kTileM - 1) / kTileM) * p.G);
      }
    });
  }
  if (b.mask[0]) grad_input = linear_shaped(grad_input, p.in_sizes);
  return {b.mask[0] ? grad_input : linear_undefined_grad(p.x), b.mask[1] ? grad_weight : linear_undefined_grad(p.x),
          b.mask[2] ? grad_bias : linear_undefined_grad(p.x)};
}

// The kernels for the shared entry points (entry_points.h).
struct CudaLinear {
  using Guard = c10::cuda::CUDAGuard;
  static std::tuple<at::Tensor, at::Tensor> forward(LinearPlan& p) { return forward_cuda(p); }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(LinearBackwardPlan& b) { return backward_cuda(b); }
};

}  // namespace

TORCH_LIBRARY_IMPL(batchops, CUDA, m) { register_linear_ops<CudaLinear>(m); }

}  // namespace batchops
