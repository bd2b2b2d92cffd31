// W4A8 GEMM (int8 activations x packed 4-bit group-wise weights): public entry
// point, dispatch and the scalar path.  Baseline flags (x86-64 / ARMv8-A).
//
// The scalar path is the definition the SIMD tiers match bit for bit: the
// product of each weight group is an exact int32, and the fp32 steps after it
// (acc + s * float(P) per group in group order, then a_scale * acc, then
// + bias) are each rounded once; -ffp-contract=off keeps the compiler from
// fusing them.  python/llmeasyquant/_reference.py w4a8_linear does the same
// operations in PyTorch.
#include <omp.h>

#include <cstdint>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"

namespace llmeq {
namespace cpu {
namespace detail {
#if defined(__x86_64__)
// Returns false when the shape is not handled (group size not a multiple of
// its 32-value block); the caller then runs the scalar path.
bool gemm_w4a8_avx2(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
                    const uint8_t* w, int64_t group_size, const float* w_scale, const int8_t* w_zero,
                    const float* bias, float* out, int num_threads);
// Pre-packed layout, groups of a multiple of 8 (else false: the scalar path).
bool gemm_w4a8_prepacked_avx512(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda,
                                const float* a_scale, const uint8_t* wp, const float* gparams, int64_t group_size,
                                const float* bias, float* out, int num_threads);
#endif
#if defined(__aarch64__)
// AdvSIMD (both Arm tiers): groups of a multiple of 16 values, bit-exact
// against the scalar path below.
bool gemm_w4a8_neon(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
                    const uint8_t* w, int64_t group_size, const float* w_scale, const int8_t* w_zero,
                    const float* bias, float* out, int num_threads);
#endif
}  // namespace detail

namespace {

void gemm_w4a8_scalar(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
                      const uint8_t* w, int64_t g, const float* w_scale, const int8_t* w_zero,
                      const float* bias, float* out, int nt) {
  const int64_t G = K / g;
  const int64_t rb = packed_row_bytes(K, 4);
  const bool par = nt > 1 && M * N * K >= (int64_t{1} << 16);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* wr = w + n * rb;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* ar = a + m * lda;
      float acc = 0.0f;
      for (int64_t gi = 0; gi < G; ++gi) {
        const int32_t z = w_zero != nullptr ? w_zero[n * G + gi] : 0;
        int32_t p = 0;
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k) p += ar[k] * (packed_value(wr, k, 4) - z);
        acc = acc + w_scale[n * G + gi] * static_cast<float>(p);
      }
      float y = a_scale[m] * acc;
      if (bias != nullptr) y = y + bias[n];
      out[m * N + n] = y;
    }
  }
}

// The pre-packed layout's scalar path: gemm_w4a8_scalar's operations in its
// order, each weight read through the layout formula of cpu_kernels.h, the
// zero-point as (8 + z) - 8 from gparams.
void gemm_w4a8_prepacked_scalar(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda,
                                const float* a_scale, const uint8_t* wp, const float* gp, int64_t g,
                                const float* bias, float* out, int nt) {
  const int64_t G = K / g;
  const int64_t pb = w4_panel_bytes(K);
  const bool par = nt > 1 && M * N * K >= (int64_t{1} << 16);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t p = n / kW4PanelCols, c = n % kW4PanelCols;
    const uint8_t* col = wp + p * pb + c * 4;
    const float* gpp = gp + p * G * 2 * kW4PanelCols + c;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* ar = a + m * lda;
      float acc = 0.0f;
      for (int64_t gi = 0; gi < G; ++gi) {
        const int32_t z = static_cast<int32_t>(gpp[(gi * 2 + 1) * kW4PanelCols]) - 8;
        int32_t P = 0;
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
          const uint8_t byte = col[(k / 8) * 64 + k % 4];
          const int32_t u = (k % 8) < 4 ? (byte & 0x0f) : (byte >> 4);
          P += ar[k] * (u - 8 - z);
        }
        acc = acc + gpp[gi * 2 * kW4PanelCols] * static_cast<float>(P);
      }
      float y = a_scale[m] * acc;
      if (bias != nullptr) y = y + bias[n];
      out[m * N + n] = y;
    }
  }
}

}  // namespace

void gemm_w4a8_prepacked(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
                         const uint8_t* wp, const float* gparams, int64_t group_size, const float* bias, float* out,
                         int num_threads) {
  if (M <= 0 || N <= 0) return;
  if (K < 0) K = 0;
  if (group_size <= 0 || group_size > K) group_size = K > 0 ? K : 1;
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#if defined(__x86_64__)
  if (has_avx512(active_isa()) &&
      detail::gemm_w4a8_prepacked_avx512(M, N, K, a, lda, a_scale, wp, gparams, group_size, bias, out, nt))
    return;
#endif
  gemm_w4a8_prepacked_scalar(M, N, K, a, lda, a_scale, wp, gparams, group_size, bias, out, nt);
}

void gemm_w4a8(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
               const uint8_t* w, int64_t group_size, const float* w_scale, const int8_t* w_zero,
               const float* bias, float* out, int num_threads) {
  if (M <= 0 || N <= 0) return;
  if (K < 0) K = 0;
  if (group_size <= 0 || group_size > K) group_size = K > 0 ? K : 1;
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  const Isa isa = active_isa();
#if defined(__x86_64__)
  // AVX-512 CPUs run the AVX2 tier (they have AVX2); a vpdpbusd variant is not written yet.
  if ((isa == Isa::Avx2 || has_avx512(isa)) &&
      detail::gemm_w4a8_avx2(M, N, K, a, lda, a_scale, w, group_size, w_scale, w_zero, bias, out, nt))
    return;
#endif
#if defined(__aarch64__)
  if ((isa == Isa::Neon || isa == Isa::NeonDotprod) &&
      detail::gemm_w4a8_neon(M, N, K, a, lda, a_scale, w, group_size, w_scale, w_zero, bias, out, nt))
    return;
#endif
  (void)isa;
  gemm_w4a8_scalar(M, N, K, a, lda, a_scale, w, group_size, w_scale, w_zero, bias, out, nt);
}

}  // namespace cpu
}  // namespace llmeq
