// W4A16 GEMM on the tensor cores (mma.sync m16n8k16, bf16 or fp16) from the
// panel layout of mma_layout.h (made once per layer by llmeasyquant/panel.py).
// Compiled, not yet validated on a GPU.
//
// Why a second W4A16 kernel: the tensor-core kernel of gemm_wo.cu reads the
// canonical [N, K/2] bytes, so every lane gathers its B fragments byte by
// byte from shared memory and converts each value through fp32; at M = 16-256
// that costs more than dequantize + cuBLAS (docs/benchmarks.md, H100). Here the
// weights were re-laid out so that one 16-byte load per lane is that lane's B
// fragments for a whole k16 x n64 tile (eight n8 tiles), and a shift + LOP3
// turns two nibbles into one 16-bit pair: the float's exponent is ORed in
// ("magic number" 128 for bf16, 1024 for fp16, whose ulp is 1 there), so the
// register holds MAGIC + q + 8; subtracting MAGIC + 8 + z gives q - z exactly
// and one multiply by the group scale (rounded to the 16-bit dtype) gives the
// weight — the rounding AWQ / Marlin-style kernels have (panel.py states the
// semantics; the op's PyTorch kernel is panel.linear).
//
// CTA: 4 warps on one 64-column panel and BM rows. A pipeline stage is 64
// values of K (A: BM x 64 through cp.async into a 128-byte-row swizzled tile;
// B: the panel's four k16 tiles, 2 KiB, contiguous; the stage's group
// parameters, 512 bytes). Warp w computes k16 step w of every stage (split-K
// inside the CTA), so a CTA covers its panel with few rows and the grid has
// N / 64 CTAs even at M = 16; the four partial sums are added in shared memory
// in a fixed order at the end (deterministic). No split-K across CTAs and no
// workspace: for N = 4096 that is 64 CTAs, each streaming K / 2 x 64 bytes.
#include "common.cuh"
#include "llmeq/mma_layout.h"

namespace llmeq {
namespace cuda {
namespace {

using mma::RC;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStageK = 64;
constexpr int kStages = 4;
constexpr int kTileBytes = 512;                  // one k16 x n64 panel tile
constexpr int kStageWBytes = 4 * kTileBytes;     // four k16 tiles per stage
constexpr int kParamFloats = 128;                // [2][8][8] per panel and group
__host__ __device__ constexpr int stage_bytes(int bm) {
  return bm * mma::kRowBytes128 + kStageWBytes + kParamFloats * 4;
}

// (w >> shift) & 0x000f000f | MAGIC in one LOP3 after the shift
// (LUT 0xea = (a & b) | c).
template <bool BF16>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w, int shift) {
  constexpr uint32_t kMagic = BF16 ? 0x43004300u : 0x64006400u;
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(w >> shift), "n"(0x000f000f), "n"(kMagic));
  return r;
}

// (h - zz) * s on a 16-bit pair: the subtraction is exact (both are small
// integers on the magic exponent), the product rounds once.
template <bool BF16>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t h, uint32_t zz, uint32_t s) {
  uint32_t r;
  if constexpr (BF16) {
    const __nv_bfloat162 v = __hmul2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&h),
                                             *reinterpret_cast<const __nv_bfloat162*>(&zz)),
                                     *reinterpret_cast<const __nv_bfloat162*>(&s));
    r = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&h), *reinterpret_cast<const __half2*>(&zz)),
                              *reinterpret_cast<const __half2*>(&s));
    r = *reinterpret_cast<const uint32_t*>(&v);
  }
  return r;
}

template <int BM, bool BF16>
__global__ void __launch_bounds__(kThreads)
    w4_panel_kernel(int M, int N, int K, const uint16_t* __restrict__ X, int64_t ldx,
                    const uint8_t* __restrict__ Wp, int K16, const float* __restrict__ gparams, int G, int g,
                    const float* __restrict__ bias, uint16_t* __restrict__ out) {
  constexpr int MT = BM / 16;
  constexpr int kA = BM * mma::kRowBytes128;
  constexpr float kMagicValue = BF16 ? 128.0f : 1024.0f;
  __shared__ __align__(16) uint8_t smem[kStages * stage_bytes(BM)];
  auto sA = [&](int s) { return smem + s * stage_bytes(BM); };
  auto sW = [&](int s) { return smem + s * stage_bytes(BM) + kA; };
  auto sP = [&](int s) { return reinterpret_cast<float*>(smem + s * stage_bytes(BM) + kA + kStageWBytes); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int panel = blockIdx.x, m0 = blockIdx.y * BM, n0 = panel * 64;
  const int nst = K16 / 4;  // stages (K16 is padded to a multiple of 4)
  const uint8_t* wpanel = Wp + static_cast<int64_t>(panel) * K16 * kTileBytes;

  auto load_stage = [&](int buf, int st) {
    const int kv = st * kStageK;
    uint8_t* a = sA(buf);
    for (int c = tid; c < BM * 8; c += kThreads) {  // 8 chunks of 8 values per row
      const int r = c >> 3, ch = c & 7, gm = m0 + r, gk = kv + ch * 8;
      const bool ok = gm < M && gk < K;  // K % 16 == 0: a chunk is all in or all out
      cp_async16(a + mma::swz128(r, ch), ok ? X + gm * ldx + gk : X, ok ? 16 : 0);
    }
    cp_async16(sW(buf) + tid * 16, wpanel + static_cast<int64_t>(st) * kStageWBytes + tid * 16, 16);
    if (tid < kParamFloats / 4) {
      const int gi = kv / g;  // g % 64 == 0 or g == K: one group per stage
      cp_async16(sP(buf) + tid * 4, gparams + (static_cast<int64_t>(panel) * G + gi) * kParamFloats + tid * 4, 16);
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nst) load_stage(s, s);
    cp_async_commit();
  }

  const int ks = warp;  // this warp's k16 step of every stage
  const int col = lane >> 2;
  for (int st = 0; st < nst; ++st) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int nxt = st + kStages - 1;
    if (nxt < nst) load_stage(nxt % kStages, nxt);
    cp_async_commit();

    const int buf = st % kStages;
    // this lane's eight columns (n = 8 j + col): scale and MAGIC + 8 + z as
    // 16-bit pairs (exact: panel.py only packs zero-points for which it is)
    const float* prm = sP(buf);
    const float4 s0 = *reinterpret_cast<const float4*>(prm + col * 8);
    const float4 s1 = *reinterpret_cast<const float4*>(prm + col * 8 + 4);
    const float4 z0 = *reinterpret_cast<const float4*>(prm + 64 + col * 8);
    const float4 z1 = *reinterpret_cast<const float4*>(prm + 64 + col * 8 + 4);
    const float sv[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
    const float zv[8] = {z0.x, z0.y, z0.z, z0.w, z1.x, z1.y, z1.z, z1.w};

    const uint4 wv = *reinterpret_cast<const uint4*>(sW(buf) + ks * kTileBytes + lane * 16);
    const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
    uint32_t bf[8][2];
#pragma unroll
    for (int wd = 0; wd < 4; ++wd)
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        // nibbles p and p + 4: n8 tile 2 wd + (p >> 1), register p & 1
        const int j = 2 * wd + (p >> 1);
        const uint32_t zz = pack_pair<BF16>(kMagicValue + zv[j], kMagicValue + zv[j]);
        const uint32_t sc = pack_pair<BF16>(sv[j], sv[j]);
        bf[j][p & 1] = dequant_pair<BF16>(nibble_pair<BF16>(words[wd], 4 * p), zz, sc);
      }

    uint32_t af[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const RC pa = mma::ldsm_h_a(lane, ks);
      ldmatrix_x4(af[i], sA(buf) + mma::swz128(i * 16 + pa.row, pa.col));
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) mma_h_16816<BF16>(acc[i][j], af[i], bf[j]);
  }
  cp_async_wait<0>();
  __syncthreads();

  // The four warps' partial sums, added as (w0 + w2) + (w1 + w3) through two
  // shared-memory slots of BM x 64 floats (lane-fastest: conflict-free); the
  // pipeline buffers are free now and hold exactly two slots.
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kSlot = MT * 8 * 4 * 32;
  static_assert(2 * kSlot * 4 <= kStages * stage_bytes(BM), "reduction slots exceed shared memory");
  auto slot_io = [&](int sl, bool add) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float* p = red + sl * kSlot + ((i * 8 + j) * 4 + e) * 32 + lane;
          if (add)
            acc[i][j][e] += *p;
          else
            *p = acc[i][j][e];
        }
  };
  if (warp >= 2) slot_io(warp - 2, false);
  __syncthreads();
  if (warp < 2) slot_io(warp, true);
  __syncthreads();
  if (warp == 1) slot_io(0, false);
  __syncthreads();
  if (warp != 0) return;
  slot_io(0, true);

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const RC c = mma::acc_c(lane, e);
        const int m = m0 + i * 16 + c.row, n = n0 + j * 8 + c.col;
        if (m >= M || n >= N) continue;
        float v = acc[i][j][e];
        if (bias) v += bias[n];
        out[static_cast<int64_t>(m) * N + n] = half_bits<BF16>(v);
      }
}

template <int BM, bool BF16>
cudaError_t launch(int M, int N, int K, const void* x, int64_t ldx, const int32_t* qpanel, int K16,
                   const float* gparams, int G, int g, const float* bias, void* out, cudaStream_t stream) {
  const dim3 grid(ceil_div(N, 64), ceil_div(M, BM));
  w4_panel_kernel<BM, BF16><<<grid, kThreads, 0, stream>>>(
      M, N, K, static_cast<const uint16_t*>(x), ldx, reinterpret_cast<const uint8_t*>(qpanel), K16, gparams, G, g,
      bias, static_cast<uint16_t*>(out));
  return cudaGetLastError();
}

template <bool BF16>
cudaError_t dispatch(int M, int N, int K, const void* x, int64_t ldx, const int32_t* qpanel, int K16,
                     const float* gparams, int G, int g, const float* bias, void* out, cudaStream_t stream) {
  if (M <= 16) return launch<16, BF16>(M, N, K, x, ldx, qpanel, K16, gparams, G, g, bias, out, stream);
  if (M <= 32) return launch<32, BF16>(M, N, K, x, ldx, qpanel, K16, gparams, G, g, bias, out, stream);
  return launch<64, BF16>(M, N, K, x, ldx, qpanel, K16, gparams, G, g, bias, out, stream);
}

}  // namespace

bool w4_panel_supported(int64_t K, int64_t g, FloatType t) {
  if (t == FloatType::F32 || K <= 0 || K % 16 != 0) return false;
  return g == K || (g % kStageK == 0 && K % g == 0);
}

cudaError_t w4_panel_gemm(int64_t M, int64_t N, int64_t K, const void* x, FloatType t, int64_t ldx,
                          const int32_t* qpanel, const float* gparams, int64_t g, const float* bias, void* out,
                          cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (!w4_panel_supported(K, g, t)) return cudaErrorInvalidValue;
  const int K16 = static_cast<int>((K + kStageK - 1) / kStageK * 4);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K), gg = static_cast<int>(g);
  const int G = static_cast<int>(K / g);
  return t == FloatType::BF16 ? dispatch<true>(m, n, k, x, ldx, qpanel, K16, gparams, G, gg, bias, out, stream)
                              : dispatch<false>(m, n, k, x, ldx, qpanel, K16, gparams, G, gg, bias, out, stream);
}

}  // namespace cuda
}  // namespace llmeq
