// AVX-512 weight-only GEMM: fp32 x int8 / int4 group-wise weights.
//
// Build: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16
//        -mf16c -mfma -ffp-contract=off
//
// Designed for small M (decode), where the op is bound by streaming the
// weights: each weight row is read once per call, dequantized in registers
// and FMA'd against every activation row of the tile, so the 1-byte or
// half-byte weights never go back to memory as floats.  Each (m, n) output
// keeps a 16-lane fp32 accumulator that is reduced once at the end.  Large M
// is correct but not tuned (the op layer dequantizes blocks and calls BLAS).
//
// Dequantization: int8 -> w = scale * float(q - zp), the reference's op.
// int4 -> a 16-entry table scale * float(v - zp) per (row, group), looked
// up with vpermps by the nibble value: one permute per 16 weights instead of
// sign extension + convert + multiply.  A second permute (vpermt2ps) restores
// natural k order so the activations need no reordering.
//
// Internal linkage only and no std:: templates (see gemm_s8_avx512.cpp).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>

#include "llmeq/cpu_kernels.h"

namespace llmeq {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline __mmask16 mask16(int64_t n) {  // lanes [0, n), n clamped to [0, 16]
  if (n <= 0) return 0;
  return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

struct WoArgs {
  int64_t M, N, K;
  const float* x;
  const uint8_t* W;  // row n at W + n * row_bytes
  int64_t row_bytes;
  int bits;
  int64_t g, G;      // group size, groups per row
  const float* scale;
  const int8_t* zp;
  const float* bias;
  float* out;
};

// Tile: MR activation rows x NR weight rows.  Register budget (32 zmm):
// MR*NR accumulators + MR (int8) or 2*MR (int4) activation vectors + the
// dequantized weights.  NR shrinks as MR grows; M = 1 uses 8 weight rows so
// 8 sequential streams are in flight.
template <int MR, int NR>
void wo_tile(const WoArgs& a, int64_t m0, int64_t n0) {
  const int64_t nvalid = a.N - n0;
  int64_t rows[NR];  // past-the-end rows repeat the last one; their results are dropped
  for (int j = 0; j < NR; ++j) rows[j] = n0 + (j < nvalid ? j : nvalid - 1);
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.K;

  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();

  if (a.bits == 8) {
    for (int64_t gi = 0; gi < a.G; ++gi) {
      __m512 s[NR];
      __m512i z[NR];
      for (int j = 0; j < NR; ++j) {
        s[j] = _mm512_set1_ps(a.scale[rows[j] * a.G + gi]);
        z[j] = _mm512_set1_epi32(a.zp != nullptr ? a.zp[rows[j] * a.G + gi] : 0);
      }
      const int64_t kb = gi * a.g, ke = kb + a.g;
      for (int64_t k = kb; k < ke; k += 16) {
        // K tail (only when G == 1): masked loads read nothing past a row; the
        // zeroed x lanes cancel the (finite) dequantized padding weights.
        const __mmask16 km = mask16(ke - k);
        __m512 xv[MR];
        for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(km, xr[i] + k);
        for (int j = 0; j < NR; ++j) {
          const __m128i q8 = _mm_maskz_loadu_epi8(km, a.W + rows[j] * a.row_bytes + k);
          const __m512i q = _mm512_sub_epi32(_mm512_cvtepi8_epi32(q8), z[j]);
          const __m512 w = _mm512_mul_ps(s[j], _mm512_cvtepi32_ps(q));
          for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], w, acc[i][j]);
        }
      }
    }
  } else {
    // Nibble value v (0..15) encodes q = v < 8 ? v : v - 16.
    const __m512i qvals = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    // Interleave low-nibble (even k) and high-nibble (odd k) lanes back into k order.
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t gi = 0; gi < a.G; ++gi) {
      __m512 tab[NR];
      for (int j = 0; j < NR; ++j) {
        const __m512i z = _mm512_set1_epi32(a.zp != nullptr ? a.zp[rows[j] * a.G + gi] : 0);
        tab[j] = _mm512_mul_ps(_mm512_set1_ps(a.scale[rows[j] * a.G + gi]),
                               _mm512_cvtepi32_ps(_mm512_sub_epi32(qvals, z)));
      }
      const int64_t kb = gi * a.g, ke = kb + a.g;
      for (int64_t k = kb; k < ke; k += 32) {
        // k is even (group sizes here are multiples of 32, or G == 1), so the
        // chunk starts at byte k/2.  The tail mask covers ceil(rem/2) bytes.
        const int64_t rem = ke - k;
        const __mmask16 bm = mask16((rem + 1) / 2);
        const __mmask16 m0 = mask16(rem), m1 = mask16(rem - 16);
        __m512 x0[MR], x1[MR];
        for (int i = 0; i < MR; ++i) {
          x0[i] = _mm512_maskz_loadu_ps(m0, xr[i] + k);
          x1[i] = rem > 16 ? _mm512_maskz_loadu_ps(m1, xr[i] + k + 16) : _mm512_setzero_ps();
        }
        for (int j = 0; j < NR; ++j) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_maskz_loadu_epi8(bm, a.W + rows[j] * a.row_bytes + k / 2));
          const __m512 lo = _mm512_permutexvar_ps(v, tab[j]);  // vpermps uses index bits 0..3
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab[j]);
          const __m512 w0 = _mm512_permutex2var_ps(lo, ilo, hi);
          const __m512 w1 = _mm512_permutex2var_ps(lo, ihi, hi);
          for (int i = 0; i < MR; ++i) {
            acc[i][j] = _mm512_fmadd_ps(x0[i], w0, acc[i][j]);
            acc[i][j] = _mm512_fmadd_ps(x1[i], w1, acc[i][j]);
          }
        }
      }
    }
  }

  const int64_t nn = imin(nvalid, NR);
  for (int i = 0; i < MR; ++i) {
    float* o = a.out + (m0 + i) * a.N + n0;
    for (int64_t j = 0; j < nn; ++j) {
      const float r = _mm512_reduce_add_ps(acc[i][j]);
      o[j] = a.bias != nullptr ? r + a.bias[n0 + j] : r;
    }
  }
}

// Weight rows per tile for a given MR (see wo_tile).
template <int MR>
struct Nr {
  static constexpr int value = MR == 1 ? 8 : MR == 2 ? 6 : MR <= 4 ? 4 : 2;
};

template <int MR>
void wo_rows(const WoArgs& a, int64_t m0, int64_t n0) {
  wo_tile<MR, Nr<MR>::value>(a, m0, n0);
}

// All M rows of tiles whose first weight row is in [n_begin, n_end); n outer /
// m inner, so the NR weight rows come from memory once and are re-read from
// L1 by the other m tiles.
void wo_range(const WoArgs& a, int64_t n_begin, int64_t n_end, int nr) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += nr) {
    int64_t m = 0;
    if (a.M >= 8) {
      // Tiles of 8 rows use NR = 2; keep them aligned to the nr grid.
      for (; m + 8 <= a.M; m += 8)
        for (int64_t n = n0; n < imin(n0 + nr, a.N); n += 2) wo_rows<8>(a, m, n);
    }
    const int64_t r = a.M - m;
    if (r == 0) continue;
    const int tile_nr = r == 1 ? 8 : r == 2 ? 6 : r <= 4 ? 4 : 2;
    for (int64_t n = n0; n < imin(n0 + nr, a.N); n += tile_nr) {
      switch (r) {
        case 7: wo_rows<7>(a, m, n); break;
        case 6: wo_rows<6>(a, m, n); break;
        case 5: wo_rows<5>(a, m, n); break;
        case 4: wo_rows<4>(a, m, n); break;
        case 3: wo_rows<3>(a, m, n); break;
        case 2: wo_rows<2>(a, m, n); break;
        default: wo_rows<1>(a, m, n); break;
      }
    }
  }
}

}  // namespace

namespace detail {

bool gemm_weight_only_avx512(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq,
                             int bits, int64_t group_size, const float* scale,
                             const int8_t* zero_point, const float* bias, float* out,
                             int num_threads) {
  const int64_t G = K / group_size;
  const int64_t chunk = bits == 8 ? 16 : 32;
  if (G > 1 && group_size % chunk != 0) return false;
  if (bits != 8 && bits != 4) return false;
  const WoArgs a{M, N, K, x, static_cast<const uint8_t*>(Wq), bits == 8 ? K : (K + 1) / 2,
                 bits, group_size, G, scale, zero_point, bias, out};
  // Weight rows are split among threads in blocks of 24 (a multiple of every
  // tile NR: 8, 6, 4, 2), so tiles never straddle two threads.
  const int64_t nr = 24;
  const int64_t blocks = (N + nr - 1) / nr;
  int nt = num_threads;
  if (M * N * (K > 0 ? K : 1) < (int64_t{1} << 16)) nt = 1;
  if (nt > blocks) nt = static_cast<int>(blocks);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t nb = blocks * t / T * nr, ne = imin(N, blocks * (t + 1) / T * nr);
    wo_range(a, nb, ne, static_cast<int>(nr));
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
