// AdvSIMD W4A8 GEMM (both Arm tiers; baseline ARMv8-A): int8 activations x
// packed 4-bit group-wise weights, an exact int32 product per group, then the
// scalar path's fp32 steps in its order (gemm_w4a8.cpp): bit-exact against it.
//
// Per 16 values: 8 packed bytes -> 16 nibbles (and / shift, zip back to the
// natural order: byte j holds elements 2j low, 2j + 1 high), xor 8 and
// subtract 8 -> signed q in [-8, 7]; each activation row multiplies them with
// smull (|a q| <= 128 * 8 fits int16) and adds pairs into int32 lanes
// (sadalp). The zero-point is applied per group in int32,
// P = sum a q - z * sum a, with the activation group sums taken once per
// call, so any int8 zero-point stays exact (K <= 65536: |P| < 2^31).
// sdot would halve the multiply work on dotprod CPUs; it is not used yet
// (this tier has not been timed on Arm hardware, only checked under qemu).
#include <arm_neon.h>
#include <omp.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "llmeq/cpu_kernels.h"

namespace llmeq {
namespace cpu {
namespace {

constexpr int kMR = 4;  // activation rows sharing one unpacked weight vector

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// 8 packed bytes -> the 16 signed 4-bit values in element order.
inline int8x16_t unpack16(const uint8_t* p) {
  const uint8x8_t b = vld1_u8(p);
  const uint8x8x2_t z = vzip_u8(vand_u8(b, vdup_n_u8(0x0f)), vshr_n_u8(b, 4));
  const uint8x16_t u = veorq_u8(vcombine_u8(z.val[0], z.val[1]), vdupq_n_u8(0x08));
  return vsubq_s8(vreinterpretq_s8_u8(u), vdupq_n_s8(8));
}

}  // namespace

namespace detail {

bool gemm_w4a8_neon(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
                    const uint8_t* w, int64_t g, const float* w_scale, const int8_t* w_zero, const float* bias,
                    float* out, int num_threads) {
  if (K <= 0 || g % 16 != 0 || K % g != 0) return false;
  const int64_t G = K / g, rb = K / 2;
  std::vector<int32_t> asum(static_cast<size_t>(M * G));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < G; ++gi) {
      int32_t s = 0;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += a[m * lda + k];
      asum[m * G + gi] = s;
    }
  const int nt = num_threads > 0 ? num_threads : 1;
  const bool par = nt > 1 && M * N * K >= (int64_t{1} << 17);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* wr = w + n * rb;
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(imin(kMR, M - m0));
      float acc[kMR] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t gi = 0; gi < G; ++gi) {
        int32x4_t p[kMR];
        for (int i = 0; i < kMR; ++i) p[i] = vdupq_n_s32(0);
        for (int64_t k = gi * g; k < (gi + 1) * g; k += 16) {
          const int8x16_t q = unpack16(wr + k / 2);
          for (int i = 0; i < mr; ++i) {
            const int8x16_t av = vld1q_s8(a + (m0 + i) * lda + k);
            p[i] = vpadalq_s16(p[i], vmull_s8(vget_low_s8(av), vget_low_s8(q)));
            p[i] = vpadalq_s16(p[i], vmull_high_s8(av, q));
          }
        }
        const int32_t z = w_zero != nullptr ? w_zero[n * G + gi] : 0;
        const float s = w_scale[n * G + gi];
        for (int i = 0; i < mr; ++i) {
          const int32_t P = vaddvq_s32(p[i]) - z * asum[(m0 + i) * G + gi];
          acc[i] = acc[i] + s * static_cast<float>(P);
        }
      }
      for (int i = 0; i < mr; ++i) {
        float y = a_scale[m0 + i] * acc[i];
        if (bias != nullptr) y = y + bias[n];
        out[(m0 + i) * N + n] = y;
      }
    }
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
