// AArch64 AdvSIMD u8 x s8 -> s32 GEMM, shared by the two Arm tiers:
//   gemm_s8_neon.cpp          baseline ARMv8-A (smull + sadalp)
//   gemm_s8_neon_dotprod.cpp  -march=armv8.2-a+dotprod (sdot)
// Each includes this file after defining its `Dot` policy (the 16-byte inner
// product step); everything here has internal linkage (anonymous namespace),
// so the dotprod translation unit's copies can never be the ones the
// baseline one links to (the reason the x86 tiers avoid shared inline code).
//
// Exactness.  AdvSIMD has udot (u8 x u8) and sdot (s8 x s8) but the mixed
// u8 x s8 usdot only with FEAT_I8MM, so A (u8, a = q + 128 in [0, 255]) is
// re-signed once per load with a xor: a' = a ^ 0x80 = a - 128 in [-128, 127],
// and
//     sum_k a[k] b[k] = sum_k a'[k] b[k] + 128 * sum_k b[k].
// Bounds (K <= 65536, the documented limit):
//  * one product |a' b| <= 128 * 128 = 16384 fits int16 (smull), four of
//    them fit an int32 sdot lane add; every int32 lane holds a partial sum of
//    at most K products: |.| <= 16384 K <= 2^30;
//  * |sum_k b| <= 128 K, so |128 sum_k b| <= 2^30;
//  * the true result |sum_k a b| <= 255 * 128 * K < 2^31 fits int32.
// All adds are done modulo 2^32 (vector adds wrap, the scalar ones use
// uint32), and the true value fits int32, so the wrapped sum *is* the exact
// result even if a partial sum had wrapped.  The K tail (K % 16 values) is
// added as plain u8 * s8 products, and the correction uses the B sum over the
// vector part only (k < K - K % 16), so each k is counted exactly once.
//
// Epilogue: per element, the same IEEE ops in the same order as the scalar
// store_scaled (gemm_s8.cpp): int32 wrap-around correction, s = as * bs,
// v = s * float(acc), v + bias; -ffp-contract=off keeps them unfused.
#pragma once

#include <arm_neon.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"  // f32_to_bf16 (static inline: one copy per TU)

namespace llmeq {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// float -> IEEE half with the FCVT instruction: round to nearest even (FPCR
// default), overflow to inf, subnormals kept (FPCR.FZ = 0 on Linux), NaN
// quieted with sign and the top 10 payload bits: the same bits as the scalar
// path's software f32_to_f16 (checked by bench_kernels: NaN / inf / overflow
// cases are in its epilogue check).
inline uint16_t to_f16(float v) {
  const float16x4_t h = vcvt_f16_f32(vdupq_n_f32(v));
  return vget_lane_u16(vreinterpret_u16_f16(h), 0);
}

// One output element (see the epilogue note above).
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
      static_cast<uint16_t*>(ep->out)[m * ep->ldo + n] = to_f16(v);
      break;
  }
}

// sum_k b[k] over k < len (int32, exact: |sum| <= 128 len).
template <class Dot>
inline int32_t row_sum(const int8_t* b, int64_t len) {
  int32x4_t acc = vdupq_n_s32(0);
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) acc = Dot::sum16(acc, vld1q_s8(b + k));
  uint32_t s = static_cast<uint32_t>(vaddvq_s32(acc));
  for (; k < len; ++k) s += static_cast<uint32_t>(static_cast<int32_t>(b[k]));
  return static_cast<int32_t>(s);
}

// MR x 4 tile: 4 * MR int32x4 accumulators + MR A + 4 B vectors (<= 24 of
// the 32 v-registers at MR = 4).  bsum[j]: sum of B row n0 + j over the
// vector part of K.  Past-the-end B rows repeat the last valid one; their
// results are dropped.
constexpr int kNR = 4;
constexpr int kMR = 4;

template <class Dot, int MR>
inline void tile(const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t nvalid,
                 int64_t K, const int32_t* bsum, int32_t* C, int64_t ldc, const GemmEpilogue* ep,
                 int64_t m0, int64_t n0) {
  const int8_t* b[kNR];
  for (int j = 0; j < kNR; ++j) b[j] = B + (j < nvalid ? j : nvalid - 1) * ldb;
  int32x4_t acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = vdupq_n_s32(0);
  const uint8x16_t flip = vdupq_n_u8(0x80);
  const int64_t K16 = K - K % 16;
  for (int64_t k = 0; k < K16; k += 16) {
    int8x16_t a[MR];
    for (int i = 0; i < MR; ++i)  // a' = a ^ 0x80 = a - 128 (s8)
      a[i] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(A + i * lda + k), flip));
    for (int j = 0; j < kNR; ++j) {
      const int8x16_t bv = vld1q_s8(b[j] + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = Dot::dot16(acc[i][j], a[i], bv);
    }
  }
  uint32_t r[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) {
      const int jj = j < nvalid ? j : static_cast<int>(nvalid - 1);
      r[i][j] = static_cast<uint32_t>(vaddvq_s32(acc[i][j])) +
                128u * static_cast<uint32_t>(bsum[jj]);
    }
  for (int64_t k = K16; k < K; ++k)  // K tail (< 16): the original u8 * s8
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j)
        r[i][j] += static_cast<uint32_t>(static_cast<int32_t>(A[i * lda + k]) *
                                         static_cast<int32_t>(b[j][k]));
  const int64_t nn = imin(nvalid, kNR);
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nn; ++j)
      store_out(C, ldc, ep, m0 + i, n0 + j, static_cast<int32_t>(r[i][j]));
}

template <class Dot>
void gemm_impl(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B,
               int64_t ldb, int32_t* C, int64_t ldc, const GemmEpilogue* ep, int num_threads) {
  const int64_t tiles = (N + kNR - 1) / kNR;
  const int64_t K16 = K - K % 16;
  // B row sums over the vector part, once per call (N int32).
  int32_t* bsum = static_cast<int32_t*>(std::malloc(static_cast<size_t>(N) * sizeof(int32_t)));
  if (bsum == nullptr) std::abort();
  const bool par = num_threads > 1 && M * N * K >= (int64_t{1} << 16);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (par)
  for (int64_t n = 0; n < N; ++n) bsum[n] = row_sum<Dot>(B + n * ldb, K16);
  // Row blocks keep a block of A in L2 while the 4 B rows of a tile are reused.
  const int64_t mblk = 64;
  for (int64_t mb = 0; mb < M; mb += mblk) {
    const int64_t me = imin(M, mb + mblk);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (par)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * kNR, nv = N - n0;
      const int8_t* bt = B + n0 * ldb;
      const int32_t* bs = bsum + n0;
      int64_t m = mb;
      for (; m + kMR <= me; m += kMR)
        tile<Dot, kMR>(A + m * lda, lda, bt, ldb, nv, K, bs, C, ldc, ep, m, n0);
      switch (me - m) {
        case 3: tile<Dot, 3>(A + m * lda, lda, bt, ldb, nv, K, bs, C, ldc, ep, m, n0); break;
        case 2: tile<Dot, 2>(A + m * lda, lda, bt, ldb, nv, K, bs, C, ldc, ep, m, n0); break;
        case 1: tile<Dot, 1>(A + m * lda, lda, bt, ldb, nv, K, bs, C, ldc, ep, m, n0); break;
        default: break;
      }
    }
  }
  std::free(bsum);
}

template <class Dot>
void row_sums_impl(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                   int num_threads) {
  const bool par = num_threads > 1 && N * K >= (int64_t{1} << 20);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (par)
  for (int64_t n = 0; n < N; ++n) out[n] = row_sum<Dot>(B + n * ldb, K);
}

}  // namespace
}  // namespace cpu
}  // namespace llmeq
