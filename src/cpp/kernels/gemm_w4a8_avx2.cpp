// AVX2 W4A8 GEMM: int8 activations x packed 4-bit group-wise weights, an exact
// int32 product per weight group, group scales applied in fp32 after it.
//
// Build: -mavx2 -mfma -mf16c -ffp-contract=off
//
// P[m, n, g] = sum_{k in g} a[m, k] * (q[n, k] - z[n, g])     (exact)
// acc = acc + s[n, g] * float(P)   per group, in order;  out = a_scale[m] * acc + bias[n]
//
// Why vpmaddubsw is exact here (it is not for W8A8: 255 x 127 x 2 saturates
// int16): the weights enter as the unsigned operand in offset binary,
// u = q + 8 in [0, 15] (the nibble xor 8), the activations as the signed one,
// |a| <= 128.  One vpmaddubsw lane is u0 a0 + u1 a1, |.| <= 2 * 15 * 128 =
// 3840, so 8 of them add in int16 without overflow (30720 < 32767): a group
// accumulates blocks of 32 values in int16 and widens (vpmaddwd by ones) once
// per group of up to 8 blocks (longer groups: once per 8), not once per block
// as the W8A8 kernels must.  The offset is
// removed per group in int32: sum u * a = P + (8 + z) * sum_{k in g} a, with
// the activation group sums computed once per call.  Every intermediate is
// below 2^31 for K <= 65536 (the op's limit): |sum u a| <= 1920 K,
// |(8 + z) * sum a| <= 136 * 128 * K.
//
// Nibble order: byte j of a 32-value block holds elements 2j (low nibble) and
// 2j + 1 (high).  One vbroadcasti128 of the 16 bytes, vpsrlvd by 0 (low half)
// / 4 (high half), and 0x0f, xor 8 gives the even elements' u in the low 128
// bits and the odd ones' in the high 128; the activations are copied once per
// call in the same order (each block: its 16 even, then its 16 odd elements),
// so no weight shuffle is needed.
//
// Schedules: tiles of MR <= 2 activation rows x 4 weight rows: 8 int16
// accumulators, the MR activation vectors of a block loaded once and the
// weight vector (MR = 3 x 4 needs 16 ymm and GCC spilled the accumulators).
// Up to 2 rows (decode) the weights are unpacked in registers per tile; from
// 3 rows on, a panel of 4 weight rows is unpacked once into a per-thread
// buffer (4 x K bytes, L1/L2) and reused by every row tile, so the unpack is
// spread over all M rows instead of MR.  Activations are processed in row
// chunks of <= 256 KiB so that a chunk stays in L2 while the panels stream
// past it.  At each group end the 4 x MR accumulators are widened, reduced
// horizontally by one vphaddd tree into [row 0 | row 1] x 4 int32 sums, and
// the group's int32 correction and fp32 step run on those 8 outputs at once.
//
// Internal linkage only and no std:: templates (see gemm_wo_avx2.cpp).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

constexpr int kNR = 4;        // weight rows per tile
constexpr int64_t kBlock = 32;  // values per vector step (16 packed bytes)
constexpr int64_t kChunkBlocks = 8;  // int16 blocks per widening (see the bound above)
constexpr int64_t kRowChunkBytes = 256 * 1024;
constexpr int64_t kDecodePrefetch = 2048;  // bytes

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

struct W4a8Args {
  int64_t M, N, K, g, G;
  const int8_t* ap;     // activations in block order [M, K]
  const int32_t* asum;  // [M, G] group sums of a
  const float* a_scale;
  const uint8_t* w;     // packed rows, K / 2 bytes each
  const float* w_scale;
  const int8_t* w_zero;
  const float* bias;
  float* out;
};

// 16 packed bytes -> 32 offset-binary weights (even elements low, odd high).
inline __m256i unpack_block(const uint8_t* p, __m256i shift, __m256i m0f, __m256i m08) {
  __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v = _mm256_srlv_epi32(v, shift);
  return _mm256_xor_si256(_mm256_and_si256(v, m0f), m08);
}

// Per panel and group: the 4 weight rows' scales and offset corrections 8 + z
// (invalid columns of a last panel: scale 0, so they add nothing).
struct PanelParams {
  float* s;     // [G][4]
  int32_t* c;   // [G][4]
};

void panel_params(const W4a8Args& A, int64_t n0, int nv, PanelParams pp) {
  for (int64_t gi = 0; gi < A.G; ++gi)
    for (int j = 0; j < kNR; ++j) {
      const bool ok = j < nv;
      pp.s[gi * kNR + j] = ok ? A.w_scale[(n0 + j) * A.G + gi] : 0.0f;
      pp.c[gi * kNR + j] = 8 + (ok && A.w_zero != nullptr ? A.w_zero[(n0 + j) * A.G + gi] : 0);
    }
}

// Eight 8-lane int32 vectors (rows r = 0, 1 x weight rows j = 0..3, v[r][j])
// -> [row 0: 4 sums | row 1: 4 sums]: one vphaddd tree for both rows.
inline __m256i hsum8(const __m256i (&v)[2][kNR]) {
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0][0], v[0][1]), _mm256_hadd_epi32(v[0][2], v[0][3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[1][0], v[1][1]), _mm256_hadd_epi32(v[1][2], v[1][3]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// One tile: MR (1 or 2) activation rows from m0 x the panel's 4 weight rows.
// kBuffered: weights from the unpacked panel buffer (wb, 4 rows of K bytes);
// otherwise unpacked here from the packed rows wr[0..3]. The group-end step
// runs on one ymm holding [row 0 | row 1] x 4 outputs (the upper half 0 when
// MR = 1): the per-group cost is most of this kernel's overhead at groups of
// 64 (2 blocks per group).
// kBpg: blocks per group when the group is 1, 2, 4 or 8 blocks (32..256
// values: the inner loop unrolls and no chunk loop runs), 0 for any other
// group length (chunks of up to 8 blocks, widened and summed in int32).
template <int MR, bool kBuffered, int kBpg>
void tile(const W4a8Args& A, int64_t m0, int64_t n0, int nv, const uint8_t* const* wr, const uint8_t* wb,
          PanelParams pp) {
  static_assert(MR == 1 || MR == 2, "tiles of 1 or 2 rows");
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i m0f = _mm256_set1_epi8(0x0f), m08 = _mm256_set1_epi8(0x08);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = A.ap + (m0 + i) * A.K;
  const int32_t* asum0 = A.asum + m0 * A.G;
  const int32_t* asum1 = A.asum + (m0 + MR - 1) * A.G;
  __m256 facc = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < A.G; ++gi) {
    const int64_t k_end = (gi + 1) * A.g;
    __m256i pacc = _mm256_setzero_si256();
    const int64_t chunk = kBpg > 0 ? kBpg * kBlock : kChunkBlocks * kBlock;
    for (int64_t kc = gi * A.g; kc < k_end; kc += chunk) {
      const int64_t kc_end = kBpg > 0 ? kc + chunk : imin(kc + chunk, k_end);
      __m256i acc[MR][kNR];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < kNR; ++j) acc[i][j] = _mm256_setzero_si256();
      for (int64_t k = kc; k < kc_end; k += kBlock) {
        // the MR activation vectors once per block, then one weight load per
        // row: MR + 4 loads for 4 MR vpmaddubsw (L1 load ports are the limit)
        __m256i av[MR];
        for (int i = 0; i < MR; ++i) av[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[i] + k));
        for (int j = 0; j < kNR; ++j) {
          // Decode reads 4 short weight rows at once; they lie side by side,
          // so a prefetch 2 KiB down the row stream is a later tile's bytes
          // (as in gemm_s8_avx2.cpp's decode path; never faults).
          if (!kBuffered && MR == 1 && ((k / 2) & 63) == 0)
            _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k / 2 + kDecodePrefetch), _MM_HINT_T0);
          const __m256i wv = kBuffered
                                 ? _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + j * A.K + k))
                                 : unpack_block(wr[j] + k / 2, shift, m0f, m08);
          for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_add_epi16(acc[i][j], _mm256_maddubs_epi16(wv, av[i]));
        }
      }
      __m256i v[2][kNR];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < kNR; ++j) v[i][j] = _mm256_madd_epi16(acc[i][j], ones);
      if constexpr (MR == 2) {
        pacc = _mm256_add_epi32(pacc, hsum8(v));
      } else {  // one row: half the tree, the upper half stays 0
        const __m256i u = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0][0], v[0][1]), _mm256_hadd_epi32(v[0][2], v[0][3]));
        pacc = _mm256_add_epi32(
            pacc, _mm256_zextsi128_si256(_mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1))));
      }
    }
    const __m256 sv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(pp.s + gi * kNR));
    const __m256i cv = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pp.c + gi * kNR)));
    const __m256i as = _mm256_setr_m128i(_mm_set1_epi32(asum0[gi]), _mm_set1_epi32(asum1[gi]));
    const __m256 p = _mm256_cvtepi32_ps(_mm256_sub_epi32(pacc, _mm256_mullo_epi32(cv, as)));
    facc = _mm256_add_ps(facc, _mm256_mul_ps(sv, p));
  }
  float bias4[kNR] = {0.f, 0.f, 0.f, 0.f};
  if (A.bias != nullptr)
    for (int j = 0; j < nv; ++j) bias4[j] = A.bias[n0 + j];
  const __m256 y8 = _mm256_mul_ps(_mm256_setr_m128(_mm_set1_ps(A.a_scale[m0]), _mm_set1_ps(A.a_scale[m0 + MR - 1])), facc);
  for (int i = 0; i < MR; ++i) {
    __m128 y = i == 0 ? _mm256_castps256_ps128(y8) : _mm256_extractf128_ps(y8, 1);
    if (A.bias != nullptr) y = _mm_add_ps(y, _mm_loadu_ps(bias4));
    float* o = A.out + (m0 + i) * A.N + n0;
    if (nv == kNR) {
      _mm_storeu_ps(o, y);
    } else {
      float t[kNR];
      _mm_storeu_ps(t, y);
      for (int j = 0; j < nv; ++j) o[j] = t[j];
    }
  }
}

template <bool kBuffered, int kBpg>
void row_tiles_g(const W4a8Args& A, int64_t m_begin, int64_t m_end, int64_t n0, int nv, const uint8_t* const* wr,
                 const uint8_t* wb, PanelParams pp) {
  int64_t m = m_begin;
  for (; m + 2 <= m_end; m += 2) tile<2, kBuffered, kBpg>(A, m, n0, nv, wr, wb, pp);
  if (m < m_end) tile<1, kBuffered, kBpg>(A, m, n0, nv, wr, wb, pp);
}

template <bool kBuffered>
void row_tiles(const W4a8Args& A, int64_t m_begin, int64_t m_end, int64_t n0, int nv, const uint8_t* const* wr,
               const uint8_t* wb, PanelParams pp) {
  switch (A.g / kBlock) {
    case 1: return row_tiles_g<kBuffered, 1>(A, m_begin, m_end, n0, nv, wr, wb, pp);
    case 2: return row_tiles_g<kBuffered, 2>(A, m_begin, m_end, n0, nv, wr, wb, pp);
    case 4: return row_tiles_g<kBuffered, 4>(A, m_begin, m_end, n0, nv, wr, wb, pp);
    case 8: return row_tiles_g<kBuffered, 8>(A, m_begin, m_end, n0, nv, wr, wb, pp);
    default: return row_tiles_g<kBuffered, 0>(A, m_begin, m_end, n0, nv, wr, wb, pp);
  }
}

// The activations in block order (each 32 values: the 16 even, then the 16
// odd elements) and their group sums.
void prepare_activations(const int8_t* a, int64_t lda, int64_t M, int64_t K, int64_t g, int8_t* ap,
                         int32_t* asum) {
  const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const int64_t G = K / g;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* src = a + m * lda;
    int8_t* dst = ap + m * K;
    for (int64_t gi = 0; gi < G; ++gi) {
      __m256i s = _mm256_setzero_si256();
      for (int64_t k = gi * g; k < (gi + 1) * g; k += kBlock) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        // in-lane: [evens, odds] of each 16; across lanes: evens of both, then odds of both
        const __m256i p = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, evens_odds), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), p);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
      }
      const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      const __m128i h2 = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
      asum[m * G + gi] = _mm_cvtsi128_si32(_mm_add_epi32(h2, _mm_shuffle_epi32(h2, 0xB1)));
    }
  }
}

// 4 packed weight rows -> 4 x K unpacked offset-binary bytes (the tile's load order).
void unpack_panel(const uint8_t* const* wr, int64_t K, uint8_t* wb) {
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i m0f = _mm256_set1_epi8(0x0f), m08 = _mm256_set1_epi8(0x08);
  for (int j = 0; j < kNR; ++j)
    for (int64_t k = 0; k < K; k += kBlock)
      _mm256_store_si256(reinterpret_cast<__m256i*>(wb + j * K + k), unpack_block(wr[j] + k / 2, shift, m0f, m08));
}

}  // namespace

namespace detail {

bool gemm_w4a8_avx2(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
                    const uint8_t* w, int64_t group_size, const float* w_scale, const int8_t* w_zero,
                    const float* bias, float* out, int num_threads) {
  const int64_t g = group_size;
  if (K <= 0 || g % kBlock != 0 || K % g != 0) return false;
  const int64_t G = K / g;
  static thread_local ThreadBuffer act_buf, sum_buf;
  int8_t* ap = act_buf.get<int8_t>(static_cast<size_t>(M * K));
  int32_t* asum = sum_buf.get<int32_t>(static_cast<size_t>(M * G));
  prepare_activations(a, lda, M, K, g, ap, asum);
  const W4a8Args A{M, N, K, g, G, ap, asum, a_scale, w, w_scale, w_zero, bias, out};
  const int64_t rb = K / 2;
  const int64_t panels = (N + kNR - 1) / kNR;
  // rows per chunk: a multiple of the 2-row tile, the chunk within kRowChunkBytes
  int64_t mc = kRowChunkBytes / K / 2 * 2;
  if (mc < 2) mc = 2;
  const int nt = num_threads > 0 ? num_threads : 1;
  const bool par = nt > 1 && panels > 1 && M * N * K >= (int64_t{1} << 17);
  for (int64_t mb = 0; mb < M; mb += mc) {
    const int64_t me = imin(M, mb + mc);
    const bool buffered = me - mb > 2;
#pragma omp parallel num_threads(nt) if (par)
    {
      static thread_local ThreadBuffer wbuf, sbuf, cbuf;
      uint8_t* wb = buffered ? wbuf.get<uint8_t>(static_cast<size_t>(kNR * K)) : nullptr;
      const PanelParams pp{sbuf.get<float>(static_cast<size_t>(G * kNR)),
                           cbuf.get<int32_t>(static_cast<size_t>(G * kNR))};
#pragma omp for schedule(static)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * kNR;
        const int nv = static_cast<int>(imin(kNR, N - n0));
        const uint8_t* wr[kNR];
        for (int j = 0; j < kNR; ++j) wr[j] = w + (n0 + (j < nv ? j : nv - 1)) * rb;
        panel_params(A, n0, nv, pp);
        if (buffered) {
          unpack_panel(wr, K, wb);
          row_tiles<true>(A, mb, me, n0, nv, wr, wb, pp);
        } else {
          row_tiles<false>(A, mb, me, n0, nv, wr, wb, pp);
        }
      }
    }
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
