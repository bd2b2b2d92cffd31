// Arm tier "neon": u8 x s8 -> s32 GEMM on baseline ARMv8-A AdvSIMD.
//
// Build: baseline flags (AdvSIMD is part of ARMv8-A), -ffp-contract=off.
// The kernel is gemm_s8_neon_impl.h (exactness proof there); this file gives
// the 16-byte inner product without sdot: smull / smull2 form the 16 products
// a' * b in int16 (|a' * b| <= 16384, no saturation: a' = a - 128 and b are
// both in [-128, 127]), sadalp adds adjacent pairs into the int32 lanes (the
// pair sums are formed in int32, never in int16: two -128 * -128 products
// would be 32768).
#include "gemm_s8_neon_impl.h"

namespace llmeq {
namespace cpu {
namespace {

struct DotSmull {
  static inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
  }
  // sum of 16 int8 into the 4 int32 lanes (saddlp to int16: |pair| <= 256).
  static inline int32x4_t sum16(int32x4_t acc, int8x16_t b) {
    return vpadalq_s16(acc, vpaddlq_s8(b));
  }
};

}  // namespace

namespace detail {

void gemm_u8s8_neon(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                    const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                    const GemmEpilogue* ep, int num_threads) {
  gemm_impl<DotSmull>(M, N, K, A, lda, B, ldb, C, ldc, ep, num_threads);
}

void row_sums_s8_neon(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                      int num_threads) {
  row_sums_impl<DotSmull>(B, N, K, ldb, out, num_threads);
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
