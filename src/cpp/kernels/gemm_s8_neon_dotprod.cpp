// Arm tier "neon_dotprod": u8 x s8 -> s32 GEMM with sdot (ARMv8.2 FEAT_DotProd).
//
// Build: -march=armv8.2-a+dotprod -ffp-contract=off (this file only; reached
// only when AT_HWCAP has HWCAP_ASIMDDP, see isa.cpp).
// The kernel is gemm_s8_neon_impl.h (exactness proof there); this file gives
// the 16-byte inner product: one sdot adds the four products a' * b of each
// 4-byte group into its int32 lane (|4 a' b| <= 65536, exact in int32).
// usdot (u8 x s8, FEAT_I8MM) would save the xor and the correction; it is not
// used: FEAT_I8MM is rarer (Neoverse V1 / N2, Apple M2+) and not needed for
// exactness.
#include "gemm_s8_neon_impl.h"

#if !defined(__ARM_FEATURE_DOTPROD)
#error "gemm_s8_neon_dotprod.cpp must be compiled with -march=armv8.2-a+dotprod"
#endif

namespace llmeq {
namespace cpu {
namespace {

struct DotSdot {
  static inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
  }
  // sum of 16 int8 into the 4 int32 lanes: sdot against ones.
  static inline int32x4_t sum16(int32x4_t acc, int8x16_t b) {
    return vdotq_s32(acc, b, vdupq_n_s8(1));
  }
};

}  // namespace

namespace detail {

void gemm_u8s8_neon_dotprod(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                            const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                            const GemmEpilogue* ep, int num_threads) {
  gemm_impl<DotSdot>(M, N, K, A, lda, B, ldb, C, ldc, ep, num_threads);
}

void row_sums_s8_neon_dotprod(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                              int num_threads) {
  row_sums_impl<DotSdot>(B, N, K, ldb, out, num_threads);
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
