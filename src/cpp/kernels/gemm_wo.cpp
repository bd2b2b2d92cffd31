// Weight-only GEMM (fp32 activations x int8 / packed 2-, 3-, 4-bit group-wise weights):
// public entry point, dispatch and the scalar path.  Baseline flags
// (x86-64 / ARMv8-A).
#include <omp.h>

#include <cstdint>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"

namespace llmeq {
namespace cpu {
namespace detail {
#if defined(__x86_64__)
// Returns false when the shape is not handled (group size not a multiple of
// the vector chunk); the caller then runs the scalar path.
bool gemm_weight_only_avx512(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq,
                             int bits, int64_t group_size, const float* scale,
                             const int8_t* zero_point, const float* bias, float* out,
                             int num_threads);
// AVX2 + FMA: every bit width (8, 4, 3, 2) and every group size dividing K.
bool gemm_weight_only_avx2(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq,
                           int bits, int64_t group_size, const float* scale,
                           const int8_t* zero_point, const float* bias, float* out,
                           int num_threads);
#endif
#if defined(__aarch64__)
// AdvSIMD (both Arm tiers): every bit width and group size, bit-exact against
// gemm_wo_scalar below (same fp32 ops in the same order; see gemm_wo_neon.cpp).
bool gemm_weight_only_neon(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq,
                           int bits, int64_t group_size, const float* scale,
                           const int8_t* zero_point, const float* bias, float* out,
                           int num_threads);
#endif
}  // namespace detail

namespace {

inline int32_t weight_at(const void* Wq, int bits, int64_t row_bytes, int64_t n, int64_t k) {
  if (bits == 8) return static_cast<const int8_t*>(Wq)[n * row_bytes + k];
  return packed_value(static_cast<const uint8_t*>(Wq) + n * row_bytes, k, bits);
}

void gemm_wo_scalar(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq, int bits,
                    int64_t g, const float* scale, const int8_t* zp, const float* bias,
                    float* out, int nt) {
  const int64_t G = K / g;
  const int64_t row_bytes = packed_row_bytes(K, bits);
  const bool par = nt > 1 && M * N * K >= (int64_t{1} << 16);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t gi = n * G + k / g;
        const int32_t q = weight_at(Wq, bits, row_bytes, n, k) - (zp != nullptr ? zp[gi] : 0);
        acc += xr[k] * (scale[gi] * static_cast<float>(q));
      }
      out[m * N + n] = bias != nullptr ? acc + bias[n] : acc;
    }
  }
}

}  // namespace

void gemm_weight_only(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq, int bits,
                      int64_t group_size, const float* scale, const int8_t* zero_point,
                      const float* bias, float* out, int num_threads) {
  if (M <= 0 || N <= 0) return;
  if (K < 0) K = 0;
  if (group_size <= 0 || group_size > K) group_size = K > 0 ? K : 1;
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  const Isa isa = active_isa();
#if defined(__x86_64__)
  if (has_avx512(isa) &&
      detail::gemm_weight_only_avx512(M, N, K, x, Wq, bits, group_size, scale, zero_point, bias,
                                      out, nt))
    return;
  // The AVX2 path also takes what the AVX-512 one declines (2/3-bit weights,
  // groups off its 16/32-value chunk grid): AVX-512 CPUs have AVX2 + FMA.
  if ((isa == Isa::Avx2 || has_avx512(isa)) &&
      detail::gemm_weight_only_avx2(M, N, K, x, Wq, bits, group_size, scale, zero_point, bias,
                                    out, nt))
    return;
#endif
#if defined(__aarch64__)
  if ((isa == Isa::Neon || isa == Isa::NeonDotprod) &&
      detail::gemm_weight_only_neon(M, N, K, x, Wq, bits, group_size, scale, zero_point, bias,
                                    out, nt))
    return;
#endif
  (void)isa;
  gemm_wo_scalar(M, N, K, x, Wq, bits, group_size, scale, zero_point, bias, out, nt);
}

}  // namespace cpu
}  // namespace llmeq
