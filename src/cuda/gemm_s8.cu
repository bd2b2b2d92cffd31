// int8 x int8 -> int32 GEMM on the tensor cores (mma.sync m16n8k32 s8, paper
// Algorithm 2's inner product) and the dp4a GEMV for decode-sized M, each with
// the fused scale / zero-point / bias epilogue. Fragment layouts, the shared
// memory swizzle and the ldmatrix addressing come from llmeq/mma_layout.h,
// which is unit-tested on the CPU.
#include <atomic>
#include <cstdlib>

#include "common.cuh"
#include "llmeq/mma_layout.h"

namespace llmeq {
namespace cuda {
namespace {

using mma::RC;

constexpr int kBK = 64;  // bytes of K per pipeline stage (two k32 mma steps)

// The epilogue of one output element; fp32 ops spelled out so that no FMA
// contraction changes the rounding against the reference
// out = (a_scale * b_scale) * float(acc - a_zero * b_sum) + bias.
// The fused epilogue for one output with activation scale a_s and zero-point
// a_z (a_z != 0 needs ep.b_sum): (acc - a_z * b_sum[n]) * (a_s * b_scale[n]) + bias[n].
__device__ __forceinline__ float epi_math(const Epilogue& ep, float a_s, int a_z, int64_t n, int acc) {
  const int v = a_z ? acc - a_z * ep.b_sum[n] : acc;
  float o = __fmul_rn(__fmul_rn(a_s, ep.b_scale[n]), __int2float_rn(v));
  if (ep.bias) o = __fadd_rn(o, ep.bias[n]);
  return o;
}

__device__ __forceinline__ float epi_value(const Epilogue& ep, int64_t m, int64_t n, int acc) {
  return epi_math(ep, ep.a_scale[m * ep.a_scale_stride],
                  ep.a_zero ? static_cast<int>(ep.a_zero[m * ep.a_zero_stride]) : 0, n, acc);
}

// Writes out[m, n] (and out[m, n + 1] when two) from raw accumulators.
__device__ __forceinline__ void epi_store(const Epilogue& ep, int64_t m, int64_t n, int acc0, int acc1, bool two) {
  const int64_t i = m * ep.ldo + n;
  const bool pair = two && (i % 2 == 0);
  switch (ep.kind) {
    case OutKind::I32: {
      int* o = static_cast<int*>(ep.out);
      if (pair) {
        *reinterpret_cast<int2*>(o + i) = make_int2(acc0, acc1);
      } else {
        o[i] = acc0;
        if (two) o[i + 1] = acc1;
      }
      break;
    }
    case OutKind::F32: {
      float* o = static_cast<float*>(ep.out);
      const float v0 = epi_value(ep, m, n, acc0), v1 = two ? epi_value(ep, m, n + 1, acc1) : 0.0f;
      if (pair) {
        *reinterpret_cast<float2*>(o + i) = make_float2(v0, v1);
      } else {
        o[i] = v0;
        if (two) o[i + 1] = v1;
      }
      break;
    }
    case OutKind::BF16: {
      __nv_bfloat16* o = static_cast<__nv_bfloat16*>(ep.out);
      const float v0 = epi_value(ep, m, n, acc0), v1 = two ? epi_value(ep, m, n + 1, acc1) : 0.0f;
      if (pair) {
        *reinterpret_cast<__nv_bfloat162*>(o + i) = __nv_bfloat162(__float2bfloat16_rn(v0), __float2bfloat16_rn(v1));
      } else {
        o[i] = __float2bfloat16_rn(v0);
        if (two) o[i + 1] = __float2bfloat16_rn(v1);
      }
      break;
    }
    case OutKind::F16: {
      __half* o = static_cast<__half*>(ep.out);
      const float v0 = epi_value(ep, m, n, acc0), v1 = two ? epi_value(ep, m, n + 1, acc1) : 0.0f;
      if (pair) {
        *reinterpret_cast<__half2*>(o + i) = __halves2half2(__float2half_rn(v0), __float2half_rn(v1));
      } else {
        o[i] = __float2half_rn(v0);
        if (two) o[i + 1] = __float2half_rn(v1);
      }
      break;
    }
  }
}

// Block tile BM x BN, warp tile WM x WN (MT x NT mma tiles), STAGES-deep
// cp.async pipeline over 64-byte K slices. With a workspace (split-K over
// gridDim.z) the int32 partial sums are added atomically (exact and order
// independent) and a second kernel applies the epilogue.
template <int BM, int BN, int WM, int WN, int STAGES>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32)
    gemm_s8_mma_kernel(int M, int N, int K, const int8_t* __restrict__ A, int64_t lda, const int8_t* __restrict__ B,
                       int64_t ldb, Epilogue ep, int32_t* __restrict__ ws, int kt_per_split) {
  constexpr int WARPS_N = BN / WN;
  constexpr int NTHREADS = (BM / WM) * WARPS_N * 32;
  constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  extern __shared__ __align__(16) int8_t smem[];
  int8_t* sA = smem;
  int8_t* sB = smem + STAGES * BM * kBK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int kt_total = (K + kBK - 1) / kBK;
  const int kt0 = blockIdx.z * kt_per_split;
  const int kt1 = min(kt_total, kt0 + kt_per_split);
  const int nkt = kt1 - kt0;
  if (nkt <= 0) return;  // only possible for an empty split (split-K)

  static_assert((BM * 4) % NTHREADS == 0 && (BN * 4) % NTHREADS == 0, "whole chunks per thread");
  auto load_tile = [&](int stage, int kt) {
    const int kb = kt * kBK;
    int8_t* a = sA + stage * BM * kBK;
    int8_t* b = sB + stage * BN * kBK;
#pragma unroll
    for (int u = 0; u < BM * 4 / NTHREADS; ++u) {
      const int c = tid + u * NTHREADS;
      const int r = c >> 2, ch = c & 3, gm = m0 + r, gk = kb + ch * 16;
      const bool ok = gm < M && gk < K;
      cp_async16(a + mma::swz64(r, ch), ok ? A + gm * lda + gk : A, ok ? 16 : 0);
    }
#pragma unroll
    for (int u = 0; u < BN * 4 / NTHREADS; ++u) {
      const int c = tid + u * NTHREADS;
      const int r = c >> 2, ch = c & 3, gn = n0 + r, gk = kb + ch * 16;
      const bool ok = gn < N && gk < K;
      cp_async16(b + mma::swz64(r, ch), ok ? B + gn * ldb + gk : B, ok ? 16 : 0);
    }
  };

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkt) load_tile(s, kt0 + s);
    cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `it` visible to all; stage (it - 1) % STAGES free again
    const int nxt = it + STAGES - 1;
    if (nxt < nkt) load_tile(nxt % STAGES, kt0 + nxt);
    cp_async_commit();

    const int8_t* a = sA + (it % STAGES) * BM * kBK;
    const int8_t* b = sB + (it % STAGES) * BN * kBK;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const RC p = mma::ldsm_s8_a(lane, ks);
        ldmatrix_x4(af[i], a + mma::swz64(wm * WM + i * 16 + p.row, p.col));
      }
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        const RC p = mma::ldsm_s8_b(lane, ks);
        uint32_t r[4];
        ldmatrix_x4(r, b + mma::swz64(wn * WN + j * 16 + p.row, p.col));
        bf[2 * j][0] = r[0];
        bf[2 * j][1] = r[1];
        bf[2 * j + 1][0] = r[2];
        bf[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_s8_16832(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // c0,c1 (row group) and c2,c3 (row group + 8)
        const RC c = mma::acc_c(lane, 2 * h);
        const int m = m0 + wm * WM + i * 16 + c.row, n = n0 + wn * WN + j * 8 + c.col;
        if (m >= M || n >= N) continue;
        const bool two = n + 1 < N;
        if (ws) {
          atomicAdd(ws + static_cast<int64_t>(m) * N + n, acc[i][j][2 * h]);
          if (two) atomicAdd(ws + static_cast<int64_t>(m) * N + n + 1, acc[i][j][2 * h + 1]);
        } else {
          epi_store(ep, m, n, acc[i][j][2 * h], acc[i][j][2 * h + 1], two);
        }
      }
}

__global__ void splitk_epilogue_kernel(int M, int N, const int32_t* __restrict__ ws, Epilogue ep) {
  const int64_t total = static_cast<int64_t>(M) * N;
  for (int64_t i = 2 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x); i < total;
       i += 2 * static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i % N;
    const bool two = n + 1 < N;
    epi_store(ep, m, n, ws[i], two ? ws[i + 1] : 0, two);
    if (!two && i + 1 < total) epi_store(ep, m + 1, 0, ws[i + 1], 0, false);
  }
}

// acc[m] = sum_k A[m, k] * B[n, k] (m < M) over one weight row that the warp
// streams in 16-byte vectors, U of them in flight per lane; a_at(m, k) is the
// k-th 16-byte vector of activation row m (global or shared memory). The
// lanes' partial sums still need a warp_sum.
template <int MMAX, typename AAt>
__device__ __forceinline__ void dp4a_row(const int4* __restrict__ brow, int kv, int lane, int M, AAt a_at,
                                         int acc[MMAX]) {
#pragma unroll
  for (int m = 0; m < MMAX; ++m) acc[m] = 0;
  constexpr int U = 4;
  for (int k0 = lane; k0 < kv; k0 += 32 * U) {
    int4 w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) w[u] = k0 + 32 * u < kv ? __ldg(brow + k0 + 32 * u) : make_int4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + 32 * u;
      if (k >= kv) break;
#pragma unroll
      for (int m = 0; m < MMAX; ++m) {
        if (m < M) {
          const int4 a = a_at(m, k);
          acc[m] = __dp4a(a.x, w[u].x, acc[m]);
          acc[m] = __dp4a(a.y, w[u].y, acc[m]);
          acc[m] = __dp4a(a.z, w[u].z, acc[m]);
          acc[m] = __dp4a(a.w, w[u].w, acc[m]);
        }
      }
    }
  }
}

// dp4a GEMV for M <= kDp4aMaxM: one warp per output channel n streams the
// weight row in 16-byte vectors (memory-bound on the weights); the few
// activation rows stay in L1/L2.
constexpr int kGemvThreads = 256;
__global__ void __launch_bounds__(kGemvThreads)
    gemv_s8_dp4a_kernel(int M, int N, int K, const int8_t* __restrict__ A, int64_t lda, const int8_t* __restrict__ B,
                        int64_t ldb, Epilogue ep) {
  const int n = blockIdx.x * (kGemvThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  int acc[kDp4aMaxM];
  dp4a_row<kDp4aMaxM>(reinterpret_cast<const int4*>(B + static_cast<int64_t>(n) * ldb), K / 16, lane, M,
                      [&](int m, int k) { return __ldg(reinterpret_cast<const int4*>(A + m * lda) + k); }, acc);
#pragma unroll
  for (int m = 0; m < kDp4aMaxM; ++m) {
    if (m < M) {
      const int v = warp_sum(acc[m]);
      if (lane == m) epi_store(ep, m, n, v, 0, false);
    }
  }
}

// Decode W8A8 in one launch: the dp4a GEMV above with the per-token
// activation quantization fused in. Today's two launches (quantize_segments,
// then the GEMV) cost a launch and an int8 round trip through memory, which at
// M = 1 is most of the gap to bf16 (docs/benchmarks.md). Here every CTA
// quantizes the M <= kFusedMaxM activation rows itself into shared memory
// (each row is K 16-bit values, read from L2 by every CTA: ~6 % of the weight
// bytes a CTA streams at M = 1) and then streams kFusedChannels weight rows.
// The reductions are max/min (order-free, NaN-propagating) and the scale and
// rounding are quant_math.h's, so the int8 activations, the scales and hence
// the output are bit-identical to the two-launch path.
// Compiled, not yet validated on a GPU.
constexpr int kFusedThreads = 256, kFusedWarps = kFusedThreads / 32, kFusedChannels = 32;
__global__ void __launch_bounds__(kFusedThreads)
    gemv_s8_fused_quant_kernel(int M, int N, int K, const void* __restrict__ X, FloatType t, int64_t ldx,
                               bool symmetric, const int8_t* __restrict__ B, int64_t ldb, Epilogue ep) {
  extern __shared__ __align__(16) int8_t qa[];  // [M][K] int8
  __shared__ float a_scale[kFusedMaxM];
  __shared__ int8_t a_zero[kFusedMaxM];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int m = 0; m < M; ++m) {
    const int64_t base = m * ldx;
    const bool vec = reinterpret_cast<uintptr_t>(static_cast<const char*>(X) + base * elem_bytes(t)) % 16 == 0;
    float amax = 0.0f, mn = INFINITY, mx = -INFINITY;
    for (int k = tid * 8; k < K; k += kFusedThreads * 8) {  // K % 16 == 0: whole chunks of 8
      float v[8];
      load8(X, base + k, t, vec, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        amax = nan_max(amax, fabsf(v[e]));
        mn = nan_min(mn, v[e]);
        mx = nan_max(mx, v[e]);
      }
    }
    block_reduce3<kFusedWarps>(amax, mn, mx);  // the barrier after the scale below separates the rows' calls
    if (tid == 0) {
      if (symmetric) {
        a_scale[m] = scale_from_absmax(amax, 8);
        a_zero[m] = 0;
      } else {
        scale_zp_from_minmax(mn, mx, 8, &a_scale[m], &a_zero[m]);
      }
    }
    __syncthreads();
    const float sc = a_scale[m];
    const int z = a_zero[m];
    for (int k = tid * 8; k < K; k += kFusedThreads * 8) {
      float v[8];
      int q[8];
      load8(X, base + k, t, vec, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[e] = quantize_value(v[e], sc, z, 8);
      write_q8(qa, static_cast<int64_t>(m) * K + k, q, true);  // K % 16 == 0: 8-byte aligned
    }
  }
  __syncthreads();
  const int kv = K / 16;
  for (int c = warp; c < kFusedChannels; c += kFusedWarps) {
    const int n = blockIdx.x * kFusedChannels + c;
    if (n >= N) break;
    int acc[kFusedMaxM];
    const auto a_at = [&](int m, int k) { return reinterpret_cast<const int4*>(qa + static_cast<int64_t>(m) * K)[k]; };
    dp4a_row<kFusedMaxM>(reinterpret_cast<const int4*>(B + static_cast<int64_t>(n) * ldb), kv, lane, M, a_at, acc);
#pragma unroll
    for (int m = 0; m < kFusedMaxM; ++m) {
      if (m < M) {
        const int v = warp_sum(acc[m]);
        if (lane == m) {
          // with this CTA's activation scale / zero-point (asymmetric: ep.b_sum)
          const float o = epi_math(ep, a_scale[m], symmetric ? 0 : a_zero[m], n, v);
          const int64_t i = static_cast<int64_t>(m) * ep.ldo + n;
          if (ep.kind == OutKind::F32)
            static_cast<float*>(ep.out)[i] = o;
          else if (ep.kind == OutKind::BF16)
            static_cast<__nv_bfloat16*>(ep.out)[i] = __float2bfloat16_rn(o);
          else if (ep.kind == OutKind::F16)
            static_cast<__half*>(ep.out)[i] = __float2half_rn(o);
          else
            static_cast<int*>(ep.out)[i] = v;  // raw accumulator, as epi_store's I32
        }
      }
    }
  }
}

struct TileCfg {
  int bm, bn;
};

template <int BM, int BN, int WM, int WN, int STAGES>
cudaError_t launch_mma(int M, int N, int K, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                       const Epilogue& ep, int32_t* ws, int splits, cudaStream_t stream) {
  constexpr int threads = (BM / WM) * (BN / WN) * 32;
  constexpr int smem = STAGES * (BM + BN) * kBK;
  auto kernel = gemm_s8_mma_kernel<BM, BN, WM, WN, STAGES>;
  if (smem > 48 * 1024) {
    // Raise the dynamic shared-memory limit once per device (it is per device).
    static std::atomic<uint64_t> raised{0};
    int dev = 0;
    cudaGetDevice(&dev);
    const uint64_t bit = uint64_t(1) << (dev & 63);
    if (!(raised.load() & bit)) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
      raised.fetch_or(bit);
    }
  }
  const int kt_total = (K + kBK - 1) / kBK;
  const int per = (kt_total + splits - 1) / splits;
  const dim3 grid(ceil_div(N, BN), ceil_div(M, BM), ceil_div(kt_total, per));
  kernel<<<grid, threads, smem, stream>>>(M, N, K, A, lda, B, ldb, ep, ws, per);
  return cudaGetLastError();
}

// Tile shape by M. Measured on H100 (docs/benchmarks.md, 2026-11-27): for
// M > 128 a 128x128 tile with 8 warps (64x32 each, ~2 blocks/SM) ran
// 1.3-2.3x faster than 128x256 with 8 warps (64x64 each, 1 block/SM by
// registers); for M <= 128, 8 warps on 64x128 gained nothing over 4.
TileCfg tile_for(int64_t M) {
  if (M <= 32) return {32, 64};
  if (M <= 128) return {64, 128};
  return {128, 128};
}

// Split K until the grid covers the SMs about twice, keeping >= 4 K slices each.
int splits_for(int64_t M, int64_t N, int64_t K, int sm_count) {
  const TileCfg t = tile_for(M);
  const int64_t tiles = ((M + t.bm - 1) / t.bm) * ((N + t.bn - 1) / t.bn);
  const int64_t kt = (K + kBK - 1) / kBK;
  int s = 1;
  while (tiles * s < 2 * sm_count && kt / (2 * s) >= 4 && s < 16) s *= 2;
  return s;
}

bool use_dp4a(int64_t M, GemmPath path) {
  return path == GemmPath::Dp4a || (path == GemmPath::Auto && M <= kDp4aAutoMaxM);
}

}  // namespace

int64_t gemm_s8_workspace(int64_t M, int64_t N, int64_t K, int sm_count, GemmPath path) {
  if (use_dp4a(M, path) && M <= kDp4aMaxM) return 0;
  return splits_for(M, N, K, sm_count) > 1 ? M * N : 0;
}

cudaError_t gemm_s8(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                    const Epilogue& ep, int32_t* workspace, int sm_count, GemmPath path, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 16 != 0) return cudaErrorInvalidValue;
  if (use_dp4a(M, path) && M <= kDp4aMaxM) {
    const int per_block = kGemvThreads / 32;
    gemv_s8_dp4a_kernel<<<ceil_div(N, per_block), kGemvThreads, 0, stream>>>(
        static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), A, lda, B, ldb, ep);
    return cudaGetLastError();
  }
  const int splits = splits_for(M, N, K, sm_count);
  int32_t* ws = splits > 1 ? workspace : nullptr;
  if (splits > 1) {
    if (!ws) return cudaErrorInvalidValue;
    const cudaError_t e = cudaMemsetAsync(ws, 0, sizeof(int32_t) * M * N, stream);
    if (e != cudaSuccess) return e;
  }
  const TileCfg t = tile_for(M);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  cudaError_t e;
  if (t.bm == 32)
    e = launch_mma<32, 64, 16, 32, 4>(m, n, k, A, lda, B, ldb, ep, ws, splits, stream);
  else if (t.bm == 64)
    e = launch_mma<64, 128, 32, 64, 4>(m, n, k, A, lda, B, ldb, ep, ws, splits, stream);
  else
    e = launch_mma<128, 128, 64, 32, 3>(m, n, k, A, lda, B, ldb, ep, ws, splits, stream);
  if (e != cudaSuccess || splits == 1) return e;
  const int64_t pairs = (M * N + 1) / 2;
  splitk_epilogue_kernel<<<ceil_div(pairs, 256) < 4096 ? ceil_div(pairs, 256) : 4096, 256, 0, stream>>>(m, n, ws, ep);
  return cudaGetLastError();
}

bool gemv_s8_fused_supported(int64_t M, int64_t K) {
  return M >= 1 && M <= kFusedMaxM && K > 0 && K % 16 == 0 && M * K <= kFusedMaxSmem;
}

cudaError_t gemv_s8_fused_quant(int64_t M, int64_t N, int64_t K, const void* x, FloatType t, int64_t ldx,
                                bool symmetric, const int8_t* B, int64_t ldb, const Epilogue& ep,
                                cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (!gemv_s8_fused_supported(M, K)) return cudaErrorInvalidValue;
  gemv_s8_fused_quant_kernel<<<ceil_div(N, kFusedChannels), kFusedThreads, static_cast<size_t>(M * K), stream>>>(
      static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), x, t, ldx, symmetric, B, ldb, ep);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmeq
