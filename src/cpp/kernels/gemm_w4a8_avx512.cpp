// AVX-512 VNNI W4A8 GEMM on pre-packed weights ("w4panel16", cpu_kernels.h):
// int8 activations x 4-bit group-wise weights, an exact int32 product per
// weight group, group scales applied in fp32 after it — the contract of
// gemm_w4a8, bit for bit.
//
// Build: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mf16c -mfma
//        -ffp-contract=off
//
// Why this layout: vpdpbusd multiplies unsigned bytes by signed bytes, four
// per int32 lane, exactly.  The weights are its unsigned operand in offset
// binary, u = q + 8 in [0, 15], the activations the signed one; a lane then
// holds sum_{4 k} u a, and
//   P = sum a (q - z) = sum a u - (8 + z) sum a
// removes the offset and the zero-point per group in int32 (the activation
// group sums taken once per call; gparams carries 8 + z).  With 16 output
// channels per 64-byte vector (a column per int32 lane, 4 consecutive k per
// lane) there is no horizontal reduction at a group end: the group step
// acc = acc + s * float(P) runs on 16 columns at once, and a group of 64
// values costs 16 vpdpbusd per 16 columns and row plus ~5 epilogue ops.
// One 64-byte load holds two k4-steps (low and high nibbles), so unpacking is
// one and + one shift + one and per two vpdpbusd per column vector, shared by
// every row of the tile.
//
// Tiles: 4 activation rows x 2 panels (32 columns): 8 int32 group
// accumulators + 8 fp32 running sums + 4 unpacked weight vectors + 2
// broadcasts = 22 zmm.  The threads split the panels; activation rows are
// taken in chunks of <= 256 KiB so that a chunk stays in L2 while the
// weights of a thread's panels stream past it (a panel pair: K * 16 bytes).
//
// Internal linkage only and no std:: templates (see gemm_s8_avx512.cpp).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

constexpr int kMR = 4;  // activation rows per tile
constexpr int kNJ = 2;  // 16-column panels per tile
constexpr int64_t kRowChunkBytes = 256 * 1024;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// acc += u8 . s8 (vpdpbusd); inline asm for the reason given in gemm_s8_avx512.cpp
// (GCC spills accumulators around the intrinsic inside loops).
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

inline int32_t load_u32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

struct Args {
  int64_t M, N, K, g, G;
  const int8_t* a;
  int64_t lda;
  const float* a_scale;
  const int32_t* asum;  // [M, G]: sum of a over each group
  const uint8_t* wp;
  const float* gp;
  const float* bias;
  float* out;
};

// Rows [m0, m0 + MR) x panels [p0, p0 + NJ).
template <int MR, int NJ>
void tile(const Args& A, int64_t m0, int64_t p0) {
  const int64_t pb = w4_panel_bytes(A.K), bpg = A.g / 8;
  const uint8_t* w[NJ];
  const float* gpp[NJ];
  for (int j = 0; j < NJ; ++j) {
    w[j] = A.wp + (p0 + j) * pb;
    gpp[j] = A.gp + (p0 + j) * A.G * 2 * kW4PanelCols;
  }
  const int8_t* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = A.a + (m0 + i) * A.lda;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  __m512 accf[MR][NJ];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NJ; ++j) accf[i][j] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < A.G; ++gi) {
    __m512i acc[MR][NJ];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int64_t b = gi * bpg, b1 = b + bpg; b < b1; ++b) {
      __m512i lo[NJ], hi[NJ];
      for (int j = 0; j < NJ; ++j) {
        const __m512i v = _mm512_loadu_si512(w[j] + b * 64);
        lo[j] = _mm512_and_si512(v, nib);                         // k = 8b + 0..3
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);   // k = 8b + 4..7
      }
      for (int i = 0; i < MR; ++i) {
        const __m512i a0 = _mm512_set1_epi32(load_u32(ar[i] + 8 * b));
        const __m512i a1 = _mm512_set1_epi32(load_u32(ar[i] + 8 * b + 4));
        for (int j = 0; j < NJ; ++j) {
          acc[i][j] = dpbusd(acc[i][j], lo[j], a0);
          acc[i][j] = dpbusd(acc[i][j], hi[j], a1);
        }
      }
    }
    // Group end: P = acc - (8 + z) * sum a (int32, exact), then the fp32 step.
    for (int j = 0; j < NJ; ++j) {
      const __m512 s = _mm512_loadu_ps(gpp[j] + gi * 2 * kW4PanelCols);
      const __m512i zo = _mm512_cvttps_epi32(_mm512_loadu_ps(gpp[j] + (gi * 2 + 1) * kW4PanelCols));
      for (int i = 0; i < MR; ++i) {
        const __m512i sa = _mm512_set1_epi32(A.asum[(m0 + i) * A.G + gi]);
        const __m512i P = _mm512_sub_epi32(acc[i][j], _mm512_mullo_epi32(sa, zo));
        accf[i][j] = _mm512_add_ps(accf[i][j], _mm512_mul_ps(s, _mm512_cvtepi32_ps(P)));
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 as = _mm512_set1_ps(A.a_scale[m0 + i]);
    for (int j = 0; j < NJ; ++j) {
      const int64_t n0 = (p0 + j) * kW4PanelCols;
      if (n0 >= A.N) break;
      const int64_t cols = imin(kW4PanelCols, A.N - n0);
      const __mmask16 mask = cols >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << cols) - 1u);
      __m512 y = _mm512_mul_ps(as, accf[i][j]);
      if (A.bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, A.bias + n0));
      _mm512_mask_storeu_ps(A.out + (m0 + i) * A.N + n0, mask, y);
    }
  }
}

template <int NJ>
void rows(const Args& A, int64_t m_begin, int64_t m_end, int64_t p0) {
  int64_t m = m_begin;
  for (; m + kMR <= m_end; m += kMR) tile<kMR, NJ>(A, m, p0);
  switch (m_end - m) {
    case 3: tile<3, NJ>(A, m, p0); break;
    case 2: tile<2, NJ>(A, m, p0); break;
    case 1: tile<1, NJ>(A, m, p0); break;
    default: break;
  }
}

// One thread's panels [p_begin, p_end), every row, a row chunk at a time.
void thread_range(const Args& A, int64_t p_begin, int64_t p_end) {
  const int64_t chunk = imin(A.M, kRowChunkBytes / (A.K > 0 ? A.K : 1) / kMR * kMR + kMR);
  for (int64_t m0 = 0; m0 < A.M; m0 += chunk) {
    const int64_t m1 = imin(A.M, m0 + chunk);
    for (int64_t p = p_begin; p < p_end; p += kNJ) {
      if (p + kNJ <= p_end) {
        rows<kNJ>(A, m0, m1, p);
      } else {
        rows<1>(A, m0, m1, p);
      }
    }
  }
}

thread_local ThreadBuffer tl_asum;

}  // namespace

namespace detail {

bool gemm_w4a8_prepacked_avx512(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda,
                                const float* a_scale, const uint8_t* wp, const float* gparams, int64_t group_size,
                                const float* bias, float* out, int num_threads) {
  if (group_size % 8 != 0 || K % group_size != 0) return false;
  const int64_t G = K / group_size;
  int32_t* asum = tl_asum.get<int32_t>(static_cast<size_t>(M * G));
  const int64_t panels = (N + kW4PanelCols - 1) / kW4PanelCols;
  int nt = num_threads;
  if (M * N * K < (int64_t{1} << 16)) nt = 1;  // a parallel region costs a few microseconds
  if (nt > panels) nt = static_cast<int>(panels);
  const Args A{M, N, K, group_size, G, a, lda, a_scale, asum, wp, gparams, bias, out};
#pragma omp parallel num_threads(nt)
  {
    // Activation group sums (exact int32), rows split over the threads.
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* ar = a + m * lda;
      for (int64_t gi = 0; gi < G; ++gi) {
        __m512i s = _mm512_setzero_si512();
        const __m512i ones = _mm512_set1_epi8(1);
        int64_t k = gi * group_size;
        const int64_t k1 = k + group_size;
        for (; k + 64 <= k1; k += 64) s = dpbusd(s, ones, _mm512_loadu_si512(ar + k));
        if (k < k1) s = dpbusd(s, ones, _mm512_maskz_loadu_epi8(~__mmask64(0) >> (64 - (k1 - k)), ar + k));
        asum[m * G + gi] = _mm512_reduce_add_epi32(s);
      }
    }
    // (the implicit barrier of the for: every sum is written before it is read)
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    // Panel ranges in whole tiles, so only the last thread may get an odd panel.
    const int64_t pairs = (panels + kNJ - 1) / kNJ;
    const int64_t p_begin = pairs * t / T * kNJ, p_end = imin(panels, pairs * (t + 1) / T * kNJ);
    thread_range(A, p_begin, p_end);
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
