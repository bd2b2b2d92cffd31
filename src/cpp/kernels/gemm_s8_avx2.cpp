// AVX2 u8 x s8 -> s32 GEMM (fallback for CPUs without AVX-512 VNNI).
//
// Build: -mavx2 -mfma -mf16c -ffp-contract=off
//
// vpmaddubsw would be the fast u8*s8 instruction, but it saturates the pair
// sums to int16 (255*127*2 > 32767), which breaks exactness.  Instead both
// operands are widened to int16 (zero-extend A, sign-extend B) and vpmaddwd
// adds pairs of products into int32: |a*b| <= 255*128, a pair <= 65280, no
// saturation (vpmaddwd only saturates for -32768*-32768 pairs).
//
// Internal linkage only and no std:: templates, for the same reason as in
// gemm_s8_avx512.cpp.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"

namespace llmeq {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// One output element; identical IEEE ops and order to the scalar path.  The
// AVX2 path is a fallback, so the epilogue stays scalar (its cost is 1/K of
// the multiply work).
inline void store_out(int32_t* C, int64_t ldc, const GemmEpilogue* ep, int64_t m, int64_t n,
                      int32_t acc) {
  if (ep == nullptr) {
    C[m * ldc + n] = acc;
    return;
  }
  if (ep->a_corr != nullptr) {
    const uint32_t corr = static_cast<uint32_t>(ep->a_corr[m * ep->a_corr_stride]) *
                          static_cast<uint32_t>(ep->b_sum[n]);
    acc = static_cast<int32_t>(static_cast<uint32_t>(acc) - corr);
  }
  const float as = ep->a_scale != nullptr ? ep->a_scale[m * ep->a_scale_stride] : 1.0f;
  const float bs = ep->b_scale != nullptr ? ep->b_scale[n] : 1.0f;
  const float s = as * bs;
  float v = s * static_cast<float>(acc);
  if (ep->bias != nullptr) v = v + ep->bias[n];
  switch (ep->out_type) {
    case FloatType::F32:
      static_cast<float*>(ep->out)[m * ep->ldo + n] = v;
      break;
    case FloatType::BF16:
      static_cast<uint16_t*>(ep->out)[m * ep->ldo + n] = f32_to_bf16(v);
      break;
    case FloatType::F16:
      static_cast<uint16_t*>(ep->out)[m * ep->ldo + n] =
          static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
      break;
  }
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// MR x 4 tile: 8 accumulators + 2 widened A + 1 widened B fit 16 ymm.
constexpr int kNR = 4;
constexpr int kMR = 2;

template <int MR>
inline void tile(const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t nvalid,
                 int64_t K, int32_t* C, int64_t ldc, const GemmEpilogue* ep, int64_t m0,
                 int64_t n0) {
  const int8_t* b[kNR];
  for (int j = 0; j < kNR; ++j) b[j] = B + (j < nvalid ? j : nvalid - 1) * ldb;
  __m256i acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i a[MR];
    for (int i = 0; i < MR; ++i)
      a[i] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(A + i * lda + k)));
    for (int j = 0; j < kNR; ++j) {
      const __m256i bv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[j] + k)));
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(a[i], bv));
    }
  }
  int32_t r[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) r[i][j] = hsum(acc[i][j]);
  for (; k < K; ++k) {  // K tail (< 16): scalar, never reads past a row
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j)
        r[i][j] += static_cast<int32_t>(A[i * lda + k]) * static_cast<int32_t>(b[j][k]);
  }
  const int64_t nn = imin(nvalid, kNR);
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nn; ++j) store_out(C, ldc, ep, m0 + i, n0 + j, r[i][j]);
}

}  // namespace

namespace detail {

void gemm_u8s8_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                    const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                    const GemmEpilogue* ep, int num_threads) {
  const int64_t tiles = (N + kNR - 1) / kNR;
  // Row blocks keep a block of A in L2 while the 4 B rows of a tile are reused.
  const int64_t mblk = 64;
  const bool par = num_threads > 1 && M * N * K >= (int64_t{1} << 16);
  for (int64_t mb = 0; mb < M; mb += mblk) {
    const int64_t me = imin(M, mb + mblk);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (par)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * kNR, nv = N - n0;
      const int8_t* bt = B + n0 * ldb;
      int64_t m = mb;
      for (; m + kMR <= me; m += kMR) tile<kMR>(A + m * lda, lda, bt, ldb, nv, K, C, ldc, ep, m, n0);
      if (m < me) tile<1>(A + m * lda, lda, bt, ldb, nv, K, C, ldc, ep, m, n0);
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
