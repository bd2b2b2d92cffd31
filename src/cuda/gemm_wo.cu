// Weight-only W8A16 / W4A16 GEMM on the tensor cores (mma.sync m16n8k16,
// bf16 or fp16). The integer weights stay 1 or 1/2 byte in memory and in
// shared memory; each thread builds its B fragments as (q - z), which is
// exact in 16 bits (|q - z| <= 255), so the tensor cores accumulate
// x * (q - z) exactly-rounded in fp32 per quantization group, and the group
// scale is applied once per group in fp32.
#include "common.cuh"
#include "llmeq/mma_layout.h"

namespace llmeq {
namespace cuda {
namespace {

using mma::RC;

constexpr int kBKV = 32;  // K values per pipeline stage (two k16 mma steps)

template <int BITS>
struct WTile {
  // Bytes of one weight row per stage, and the padded shared-memory row
  // stride that keeps the fragment reads free of bank conflicts.
  static constexpr int kBytes = BITS == 8 ? 32 : 16;
  static constexpr int kStride = BITS == 8 ? 48 : 16;
};

template <int BITS>
__device__ __forceinline__ void load_q2(const uint8_t* row, int k, int& q0, int& q1) {
  if constexpr (BITS == 8) {
    const uint16_t u = *reinterpret_cast<const uint16_t*>(row + k);
    q0 = static_cast<int8_t>(u & 0xff);
    q1 = static_cast<int8_t>(u >> 8);
  } else {
    const int b = row[k >> 1];  // k even: values k, k+1 share a byte
    q0 = ((b & 0xf) ^ 8) - 8;
    q1 = ((b >> 4) ^ 8) - 8;
  }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int BITS, bool BF16, int STAGES>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    weight_only_kernel(int M, int N, int K, const uint16_t* __restrict__ X, int64_t ldx, const uint8_t* __restrict__ W,
                       int G, int g, const float* __restrict__ scale, const int8_t* __restrict__ zp,
                       const float* __restrict__ bias, uint16_t* __restrict__ out) {
  constexpr int NTHREADS = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  using T = WTile<BITS>;
  __shared__ __align__(16) uint8_t sA[STAGES][BM * 64];
  __shared__ __align__(16) uint8_t sW[STAGES][BN * T::kStride];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int ldw = BITS == 8 ? K : K / 2;
  const int nkt = (K + kBKV - 1) / kBKV;

  auto load_tile = [&](int stage, int kt) {
    const int kv = kt * kBKV;
    for (int c = tid; c < BM * 4; c += NTHREADS) {  // 4 chunks of 8 values
      const int r = c >> 2, ch = c & 3, gm = m0 + r, gk = kv + ch * 8;
      const bool ok = gm < M && gk < K;
      cp_async16(&sA[stage][mma::swz64(r, ch)], ok ? X + gm * ldx + gk : X, ok ? 16 : 0);
    }
    constexpr int CH = T::kBytes / 16;
    for (int c = tid; c < BN * CH; c += NTHREADS) {
      const int r = c / CH, ch = c % CH, gn = n0 + r;
      const int kb = (BITS == 8 ? kv : kv / 2) + ch * 16;
      const int valid = gn < N ? min(16, max(0, ldw - kb)) : 0;
      cp_async16(&sW[stage][r * T::kStride + ch * 16], valid ? W + static_cast<int64_t>(gn) * ldw + kb : W, valid);
    }
  };

  float acc[MT][NT][4], part[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = part[i][j][e] = 0.0f;

  // Zero-points of this lane's B columns (n = group of the lane) for the
  // current quantization group.
  int zcol[NT];
  auto load_z = [&](int gi) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = n0 + wn * WN + j * 8 + (lane >> 2);
      zcol[j] = (zp && n < N) ? zp[static_cast<int64_t>(n) * G + gi] : 0;
    }
  };
  auto fold = [&](int gi) {  // acc += scale[n, gi] * part; part = 0
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const RC c = mma::acc_c(lane, e);
        const int n = n0 + wn * WN + j * 8 + c.col;
        const float s = n < N ? scale[static_cast<int64_t>(n) * G + gi] : 0.0f;
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          acc[i][j][e] = __fadd_rn(acc[i][j][e], __fmul_rn(s, part[i][j][e]));
          acc[i][j][e + 2] = __fadd_rn(acc[i][j][e + 2], __fmul_rn(s, part[i][j][e + 2]));
          part[i][j][e] = part[i][j][e + 2] = 0.0f;
        }
      }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkt) load_tile(s, s);
    cp_async_commit();
  }
  load_z(0);
  const int tiles_per_group = g / kBKV;  // g % 32 == 0, or g == K (one group)

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nxt = it + STAGES - 1;
    if (nxt < nkt) load_tile(nxt % STAGES, nxt);
    cp_async_commit();

    const uint8_t* a = sA[it % STAGES];
    const uint8_t* w = sW[it % STAGES];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const RC p = mma::ldsm_h_a(lane, ks);
        ldmatrix_x4(af[i], a + mma::swz64(wm * WM + i * 16 + p.row, p.col));
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const RC b0 = mma::h_b(lane, 0), b2 = mma::h_b(lane, 2);
        const uint8_t* row = w + (wn * WN + j * 8 + b0.col) * T::kStride;
        int q0, q1, q2, q3;
        load_q2<BITS>(row, ks * 16 + b0.row, q0, q1);
        load_q2<BITS>(row, ks * 16 + b2.row, q2, q3);
        const int z = zcol[j];
        bf[j][0] = pack_pair<BF16>(static_cast<float>(q0 - z), static_cast<float>(q1 - z));
        bf[j][1] = pack_pair<BF16>(static_cast<float>(q2 - z), static_cast<float>(q3 - z));
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_h_16816<BF16>(part[i][j], af[i], bf[j]);
    }
    if (g != K && (it + 1) % tiles_per_group == 0) {
      const int gi = it / tiles_per_group;
      fold(gi);
      if (gi + 1 < G) load_z(gi + 1);
    }
  }
  cp_async_wait<0>();
  if (g == K) fold(0);

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const RC c = mma::acc_c(lane, e);
        const int m = m0 + wm * WM + i * 16 + c.row, n = n0 + wn * WN + j * 8 + c.col;
        if (m >= M || n >= N) continue;
        float v = acc[i][j][e];
        if (bias) v = __fadd_rn(v, bias[n]);
        out[static_cast<int64_t>(m) * N + n] = half_bits<BF16>(v);
      }
}

// GEMV for decode-sized M: one warp per output channel streams its weight row
// in 16-byte vectors (16 values at 8 bits, 32 at 4 bits, always inside one
// quantization group since g % 32 == 0 or g == K), forms (q - z) in fp32 and
// accumulates x * (q - z) per vector, scaled by the group scale.
constexpr int kGemvThreads = 256;
template <int BITS, bool BF16>
__global__ void __launch_bounds__(kGemvThreads)
    weight_only_gemv_kernel(int M, int N, int K, const uint16_t* __restrict__ X, int64_t ldx,
                            const uint8_t* __restrict__ W, int G, int g, const float* __restrict__ scale,
                            const int8_t* __restrict__ zp, const float* __restrict__ bias,
                            uint16_t* __restrict__ out) {
  constexpr int VPC = BITS == 8 ? 16 : 32;  // values per 16-byte weight vector
  const int n = blockIdx.x * (kGemvThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const int ldw = BITS == 8 ? K : K / 2;
  const uint4* wrow = reinterpret_cast<const uint4*>(W + static_cast<int64_t>(n) * ldw);
  float acc[kWoGemvMaxM];
#pragma unroll
  for (int m = 0; m < kWoGemvMaxM; ++m) acc[m] = 0.0f;
  const int chunks = K / VPC;
  constexpr int U = 2;  // weight vectors in flight per lane
  for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) wv[u] = c0 + 32 * u < chunks ? __ldg(wrow + c0 + 32 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
      const int k0 = c * VPC, gi = k0 / g;
      const float s = scale[static_cast<int64_t>(n) * G + gi];
      const int z = zp ? zp[static_cast<int64_t>(n) * G + gi] : 0;
      float wf[VPC];
      const uint32_t words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
      for (int i = 0; i < VPC; ++i) {
        int q;
        if constexpr (BITS == 8) {
          q = static_cast<int8_t>((words[i / 4] >> (8 * (i % 4))) & 0xffu);
        } else {
          q = static_cast<int>((words[i / 8] >> (4 * (i % 8))) & 0xfu);
          q = (q ^ 8) - 8;
        }
        wf[i] = static_cast<float>(q - z);
      }
#pragma unroll
      for (int m = 0; m < kWoGemvMaxM; ++m) {
        if (m >= M) break;
        const uint4* xr = reinterpret_cast<const uint4*>(X + m * ldx + k0);
        float t = 0.0f;
#pragma unroll
        for (int v = 0; v < VPC / 8; ++v) {
          const uint4 xv = __ldg(xr + v);
          const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float lo, hi;
            if constexpr (BF16) {
              lo = __uint_as_float(xw[j] << 16);
              hi = __uint_as_float(xw[j] & 0xffff0000u);
            } else {
              lo = __half2float(__ushort_as_half(static_cast<unsigned short>(xw[j] & 0xffffu)));
              hi = __half2float(__ushort_as_half(static_cast<unsigned short>(xw[j] >> 16)));
            }
            t += lo * wf[8 * v + 2 * j] + hi * wf[8 * v + 2 * j + 1];
          }
        }
        acc[m] += s * t;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kWoGemvMaxM; ++m) {
    if (m >= M) break;
    const float v = warp_sum(acc[m]);
    if (lane == 0) {
      const float o = bias ? v + bias[n] : v;
      out[static_cast<int64_t>(m) * N + n] = half_bits<BF16>(o);
    }
  }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int BITS, bool BF16>
cudaError_t launch_wo(int M, int N, int K, const void* x, int64_t ldx, const void* qw, int g, const float* scale,
                      const int8_t* zp, const float* bias, void* out, cudaStream_t stream) {
  const dim3 grid(ceil_div(N, BN), ceil_div(M, BM));
  weight_only_kernel<BM, BN, WARPS_M, WARPS_N, BITS, BF16, 3><<<grid, WARPS_M * WARPS_N * 32, 0, stream>>>(
      M, N, K, static_cast<const uint16_t*>(x), ldx, static_cast<const uint8_t*>(qw), K / g, g, scale, zp, bias,
      static_cast<uint16_t*>(out));
  return cudaGetLastError();
}

template <int BITS, bool BF16>
cudaError_t dispatch_m(int M, int N, int K, const void* x, int64_t ldx, const void* qw, int g, const float* scale,
                       const int8_t* zp, const float* bias, void* out, WoPath path, cudaStream_t stream) {
  if (path == WoPath::Gemv) {
    weight_only_gemv_kernel<BITS, BF16><<<ceil_div(N, kGemvThreads / 32), kGemvThreads, 0, stream>>>(
        M, N, K, static_cast<const uint16_t*>(x), ldx, static_cast<const uint8_t*>(qw), K / g, g, scale, zp, bias,
        static_cast<uint16_t*>(out));
    return cudaGetLastError();
  }
  if (M <= 16) return launch_wo<16, 32, 1, 4, BITS, BF16>(M, N, K, x, ldx, qw, g, scale, zp, bias, out, stream);
  if (M <= 64) return launch_wo<64, 64, 2, 2, BITS, BF16>(M, N, K, x, ldx, qw, g, scale, zp, bias, out, stream);
  return launch_wo<128, 64, 4, 2, BITS, BF16>(M, N, K, x, ldx, qw, g, scale, zp, bias, out, stream);
}

}  // namespace

WoPath weight_only_path(int64_t M, WoPath requested) {
  if (requested == WoPath::Gemv && M > kWoGemvMaxM) return WoPath::Mma;
  if (requested != WoPath::Auto) return requested;
  return M <= kWoGemvMaxM ? WoPath::Gemv : WoPath::Dequant;
}

bool weight_only_supported(int64_t K, int bits, int64_t g, FloatType t) {
  if (t == FloatType::F32) return false;
  if (K % (bits == 4 ? 32 : 16) != 0) return false;
  return g == K || g % kBKV == 0;
}

cudaError_t weight_only_gemm(int64_t M, int64_t N, int64_t K, const void* x, FloatType t, int64_t ldx, const void* qw,
                             int bits, int64_t g, const float* scale, const int8_t* zp, const float* bias, void* out,
                             WoPath path, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (!weight_only_supported(K, bits, g, t) || path == WoPath::Dequant || path == WoPath::Auto ||
      (path == WoPath::Gemv && M > kWoGemvMaxM))
    return cudaErrorInvalidValue;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K), gg = static_cast<int>(g);
  const bool bf = t == FloatType::BF16;
  if (bits == 8)
    return bf ? dispatch_m<8, true>(m, n, k, x, ldx, qw, gg, scale, zp, bias, out, path, stream)
              : dispatch_m<8, false>(m, n, k, x, ldx, qw, gg, scale, zp, bias, out, path, stream);
  return bf ? dispatch_m<4, true>(m, n, k, x, ldx, qw, gg, scale, zp, bias, out, path, stream)
            : dispatch_m<4, false>(m, n, k, x, ldx, qw, gg, scale, zp, bias, out, path, stream);
}

}  // namespace cuda
}  // namespace llmeq
