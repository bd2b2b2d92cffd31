// u8 x s8 -> s32 GEMM: public entry points, ISA dispatch and the scalar path.
//
// Compiled with baseline flags (x86-64 / ARMv8-A): the scalar path must run on
// any CPU and is the bit-exact reference the SIMD paths are checked against.
// The SIMD implementations live in gemm_s8_avx2.cpp / gemm_s8_avx512.cpp
// (x86-64) and gemm_s8_neon.cpp / gemm_s8_neon_dotprod.cpp (aarch64), each
// compiled with its own flags and only for its architecture, and are reached
// only through active_isa().
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"  // f32_to_bf16: RNE, NaN kept quiet (same as the AVX-512 path)
#include "parallel.h"

namespace llmeq {
namespace cpu {
namespace detail {
// ep == nullptr: write the raw int32 product to C (stride ldc).
// ep != nullptr: apply the fused epilogue, C is unused.
#if defined(__x86_64__)
void gemm_u8s8_avx512(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                      const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                      const GemmEpilogue* ep, int num_threads);
void gemm_u8s8_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                    const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                    const GemmEpilogue* ep, int num_threads);
void row_sums_s8_avx512(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                        int num_threads);
void gemm_u8s8_prepacked_avx512(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                                const int8_t* Bp, int32_t* C, int64_t ldc, const GemmEpilogue* ep,
                                int num_threads);
void gemm_u8s8_prepacked_amx(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                             const int8_t* Bp, int32_t* C, int64_t ldc, const GemmEpilogue* ep,
                             int num_threads);
#endif
#if defined(__aarch64__)
void gemm_u8s8_neon(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                    const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                    const GemmEpilogue* ep, int num_threads);
void gemm_u8s8_neon_dotprod(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                            const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                            const GemmEpilogue* ep, int num_threads);
void row_sums_s8_neon(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                      int num_threads);
void row_sums_s8_neon_dotprod(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                              int num_threads);
#endif
}  // namespace detail

namespace {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Software float -> half, round-to-nearest-even, bit-identical to F16C
// vcvtps2ph(imm = RNE) for all 2^32 inputs (checked exhaustively), so the
// scalar path needs no F16C.  NaN: quiet, sign and top 10 payload bits kept.
inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 -> inf
  if (ax >= 0x38800000u) {  // normal half: rebias exponent, round mantissa
    const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
  }
  const uint32_t e = ax >> 23;
  if (e < 102) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;    // subnormal half
  const uint32_t s = 126 - e;
  uint32_t q = m >> s;
  const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

// The epilogue of one element.  -ffp-contract=off keeps (as*bs)*t + bias as
// two roundings of mul and one of add, the same IEEE ops the SIMD paths use.
inline void store_scaled(const GemmEpilogue& ep, int64_t m, int64_t n, int32_t acc) {
  if (ep.a_corr != nullptr) {
    // int32 wrap-around semantics (as the SIMD mullo/sub), without signed-overflow UB.
    const uint32_t corr = static_cast<uint32_t>(ep.a_corr[m * ep.a_corr_stride]) *
                          static_cast<uint32_t>(ep.b_sum[n]);
    acc = static_cast<int32_t>(static_cast<uint32_t>(acc) - corr);
  }
  const float as = ep.a_scale != nullptr ? ep.a_scale[m * ep.a_scale_stride] : 1.0f;
  const float bs = ep.b_scale != nullptr ? ep.b_scale[n] : 1.0f;
  const float s = as * bs;
  float v = s * static_cast<float>(acc);
  if (ep.bias != nullptr) v = v + ep.bias[n];
  switch (ep.out_type) {
    case FloatType::F32:
      static_cast<float*>(ep.out)[m * ep.ldo + n] = v;
      break;
    case FloatType::BF16:
      static_cast<uint16_t*>(ep.out)[m * ep.ldo + n] = f32_to_bf16(v);
      break;
    case FloatType::F16:
      static_cast<uint16_t*>(ep.out)[m * ep.ldo + n] = f32_to_f16(v);
      break;
  }
}

// Reference implementation: 4 columns at a time so each A row is reused from
// registers/L1; plain int32 accumulation is exact for K <= 65536.
void gemm_scalar(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B,
                 int64_t ldb, int32_t* C, int64_t ldc, const GemmEpilogue* ep, int nt) {
  const int64_t nblk = (N + 3) / 4;
  const bool par = nt > 1 && M * N * K >= (int64_t{1} << 18);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t jb = 0; jb < nblk; ++jb) {
    const int64_t n0 = jb * 4, nn = N - n0 < 4 ? N - n0 : 4;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* a = A + m * lda;
      int32_t acc[4] = {0, 0, 0, 0};
      for (int64_t j = 0; j < nn; ++j) {
        const int8_t* b = B + (n0 + j) * ldb;
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(a[k]) * static_cast<int32_t>(b[k]);
        acc[j] = s;
      }
      for (int64_t j = 0; j < nn; ++j) {
        if (ep == nullptr) {
          C[m * ldc + n0 + j] = acc[j];
        } else {
          store_scaled(*ep, m, n0 + j, acc[j]);
        }
      }
    }
  }
}

void gemm_dispatch(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                   const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc, const GemmEpilogue* ep,
                   int num_threads) {
  if (M <= 0 || N <= 0) return;
  if (K < 0) K = 0;
  const int nt = resolve_threads(num_threads);
  // A tier of the other architecture is never active (detect() cannot
  // return it and the cap never raises), so its case is compiled out.
  switch (active_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512Amx:
    case Isa::Avx512Vnni:
      detail::gemm_u8s8_avx512(M, N, K, A, lda, B, ldb, C, ldc, ep, nt);
      return;
    case Isa::Avx2:
      detail::gemm_u8s8_avx2(M, N, K, A, lda, B, ldb, C, ldc, ep, nt);
      return;
#endif
#if defined(__aarch64__)
    case Isa::NeonDotprod:
      detail::gemm_u8s8_neon_dotprod(M, N, K, A, lda, B, ldb, C, ldc, ep, nt);
      return;
    case Isa::Neon:
      detail::gemm_u8s8_neon(M, N, K, A, lda, B, ldb, C, ldc, ep, nt);
      return;
#endif
    default:
      break;
  }
  gemm_scalar(M, N, K, A, lda, B, ldb, C, ldc, ep, nt);
}

// The pre-packed layout's scalar path: the same sums in the same order per
// output as gemm_scalar (exact either way), byte (n, k) addressed through the
// panel formula of cpu_kernels.h.
void gemm_prepacked_scalar(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                           const int8_t* Bp, int32_t* C, int64_t ldc, const GemmEpilogue* ep, int nt) {
  const int64_t pstride = s8_panel_bytes(K);
  const bool par = nt > 1 && M * N * K >= (int64_t{1} << 18);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* col = Bp + (n / kS8PanelCols) * pstride + (n % kS8PanelCols) * 4;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* a = A + m * lda;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += static_cast<int32_t>(a[k]) * static_cast<int32_t>(col[(k / 4) * kS8PanelCols * 4 + k % 4]);
      if (ep == nullptr) {
        C[m * ldc + n] = s;
      } else {
        store_scaled(*ep, m, n, s);
      }
    }
  }
}

// Where the AMX kernel runs (gemm_s8_amx.cpp): K in whole 64-byte tile rows,
// and M past the crossover with the VNNI broadcast kernel (its 16-row tiles
// compute padding below). Measured, 2 threads, hot weights, Xeon with AMX:
// 4096 x 4096 M = 4 0.39 vs 0.29 ms, M = 8 0.385 vs 0.394, M = 12 0.384 vs
// 0.416; 1536 x 576 M = 8 11 vs 14 us (docs/benchmarks.md, "AMX").
constexpr int64_t kAmxK = 64;
constexpr int64_t kAmxMinRows = 8;

void gemm_prepacked_dispatch(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                             const int8_t* Bp, int32_t* C, int64_t ldc, const GemmEpilogue* ep,
                             int num_threads) {
  if (M <= 0 || N <= 0) return;
  if (K < 0) K = 0;
  const int nt = resolve_threads(num_threads);
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::Avx512Amx && K > 0 && K % kAmxK == 0 && M >= kAmxMinRows) {
    detail::gemm_u8s8_prepacked_amx(M, N, K, A, lda, Bp, C, ldc, ep, nt);
    return;
  }
  if (has_avx512(isa)) {
    detail::gemm_u8s8_prepacked_avx512(M, N, K, A, lda, Bp, C, ldc, ep, nt);
    return;
  }
#endif
  gemm_prepacked_scalar(M, N, K, A, lda, Bp, C, ldc, ep, nt);
}

}  // namespace

void gemm_u8s8s32(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                  const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc, int num_threads) {
  gemm_dispatch(M, N, K, A, lda, B, ldb, C, ldc, nullptr, num_threads);
}

void gemm_u8s8_scaled(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                      const int8_t* B, int64_t ldb, const GemmEpilogue& ep, int num_threads) {
  gemm_dispatch(M, N, K, A, lda, B, ldb, nullptr, 0, &ep, num_threads);
}

void pack_s8_panels(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int8_t* dst) {
  if (N <= 0) return;
  if (K < 0) K = 0;
  const int64_t pstride = s8_panel_bytes(K), panels = (N + kS8PanelCols - 1) / kS8PanelCols;
  std::memset(dst, 0, static_cast<size_t>(panels * pstride));
  for (int64_t n = 0; n < N; ++n) {
    int8_t* col = dst + (n / kS8PanelCols) * pstride + (n % kS8PanelCols) * 4;
    for (int64_t k = 0; k < K; ++k) col[(k / 4) * kS8PanelCols * 4 + k % 4] = B[n * ldb + k];
  }
}

void gemm_u8s8s32_prepacked(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                            const int8_t* Bp, int32_t* C, int64_t ldc, int num_threads) {
  gemm_prepacked_dispatch(M, N, K, A, lda, Bp, C, ldc, nullptr, num_threads);
}

void gemm_u8s8_prepacked_scaled(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                                const int8_t* Bp, const GemmEpilogue& ep, int num_threads) {
  gemm_prepacked_dispatch(M, N, K, A, lda, Bp, nullptr, 0, &ep, num_threads);
}

bool has_prepacked_simd() { return has_avx512(active_isa()); }

void row_sums_s8(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                 int num_threads) {
  if (N <= 0) return;
  if (K < 0) K = 0;
  const int nt = resolve_threads(num_threads);
  const Isa isa = active_isa();
#if defined(__x86_64__)
  if (has_avx512(isa)) {
    detail::row_sums_s8_avx512(B, N, K, ldb, out, nt);
    return;
  }
#endif
#if defined(__aarch64__)
  if (isa == Isa::NeonDotprod) {
    detail::row_sums_s8_neon_dotprod(B, N, K, ldb, out, nt);
    return;
  }
  if (isa == Isa::Neon) {
    detail::row_sums_s8_neon(B, N, K, ldb, out, nt);
    return;
  }
#endif
  (void)isa;
  // Scalar (also the AVX2 choice: the compiler vectorizes this loop well
  // enough and row sums are computed once per weight).
  const bool par = nt > 1 && N * K >= (int64_t{1} << 20);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* b = B + n * ldb;
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += b[k];
    out[n] = s;
  }
}

}  // namespace cpu
}  // namespace llmeq
