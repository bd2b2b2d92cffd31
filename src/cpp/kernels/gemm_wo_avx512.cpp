// AVX-512 weight-only GEMM: fp32 x int8 / int4 group-wise weights.
//
// Build: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16
//        -mf16c -mfma -ffp-contract=off
//
// Dot-product schedule: a tile of MR (<= 3) activation rows x NR weight rows
// (8 for M = 1, else 4) keeps one 16-lane fp32 accumulator per output,
// reduced once at the end (fp32 throughout; the summation order differs from
// the reference, within fp32 tolerance).  Weights are dequantized in
// registers straight from their 1-byte / half-byte storage and never written
// back as fp32; a tile's weight rows are read from memory once per call and
// re-read from L1 by the other row tiles.  At M = 1 the op is bound by the
// weight stream, at M >= 3 by the FMAs, so the per-weight decode work is kept
// to a minimum:
//  * int8: accumulate x * float(q) and apply scale and zero-point once per
//    group: sum x*(q-z)*s = s * (sum x*q - z * sum x).
//  * int4: look each nibble up in a 16-entry table s*(v - z) with vpermps (one
//    instruction per 16 weights, scale and zero-point included), against a
//    copy of x whose even / odd elements are pre-split to match the nibble
//    order of a byte.
// A variant that dequantized 4 rows x 512 into an L1 fp32 buffer shared by
// all row tiles measured slower at every M in 4..32 (store + reload of the
// buffer costs more than re-decoding in registers).
//
// The "#pragma GCC unroll" on the fixed-trip register-tile loops are needed:
// without them GCC 12 keeps the accumulator arrays in memory and stores every
// accumulator to the stack on each K step (3x slower).
//
// Internal linkage only and no std:: templates (see gemm_s8_avx512.cpp).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>

#include "llmeq/cpu_kernels.h"
#include "thread_buffer.h"

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
  int64_t g, G;  // group size, groups per row
  const float* scale;
  const int8_t* zp;
  const float* bias;
  float* out;
};

thread_local ThreadBuffer tl_xsplit;  // int4: x with even / odd k split

// Nibble value v (0..15) encodes q = v < 8 ? v : v - 16.
inline __m512i nibble_values() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}

// 16-entry dequantization table s * (q(v) - z) for one (row, group).
inline __m512 int4_table(const WoArgs& a, int64_t row, int64_t gi) {
  const __m512i z = _mm512_set1_epi32(a.zp != nullptr ? a.zp[row * a.G + gi] : 0);
  return _mm512_mul_ps(_mm512_set1_ps(a.scale[row * a.G + gi]),
                       _mm512_cvtepi32_ps(_mm512_sub_epi32(nibble_values(), z)));
}

inline void store_out(const WoArgs& a, int64_t m, int64_t n, float v) {
  a.out[m * a.N + n] = a.bias != nullptr ? v + a.bias[n] : v;
}

// MR x NR tile, int8 weights.  acc: sum over the current group of x * q;
// tot: sum over groups of s * (acc - z * sum x).  MR = 1 uses 8 weight rows
// (8 sequential streams in flight), MR = 2, 3 use 4 (register budget:
// 2*MR*NR accumulators + 2*MR x vectors).
template <int MR, int NR>
void stream_tile_s8(const WoArgs& a, int64_t m0, int64_t n0) {
  const int64_t nvalid = a.N - n0;
  const uint8_t* w[NR];
  int64_t rows[NR];  // past-the-end rows repeat the last one; results dropped
  #pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    rows[j] = n0 + (j < nvalid ? j : nvalid - 1);
    w[j] = a.W + rows[j] * a.row_bytes;
  }
  const float* xr[MR];
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.K;
  const bool has_zp = a.zp != nullptr;
  __m512 tot[MR][NR];
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < a.G; ++gi) {
    __m512 acc[MR][NR], xs[MR];
    #pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      xs[i] = _mm512_setzero_ps();
      #pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    }
    const int64_t ke = (gi + 1) * a.g;
    // One 16-weight chunk; km masks the K tail (only when G == 1): masked
    // loads read nothing past a row and the zero bytes contribute nothing.
    auto chunk = [&](int64_t k, __mmask16 km, bool full) {
      __m512 xv[MR];
      #pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        xv[i] = full ? _mm512_loadu_ps(xr[i] + k) : _mm512_maskz_loadu_ps(km, xr[i] + k);
        if (has_zp) xs[i] = _mm512_add_ps(xs[i], xv[i]);
      }
      #pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const __m128i q8 = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + k))
                                : _mm_maskz_loadu_epi8(km, w[j] + k);
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8));
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], q, acc[i][j]);
      }
    };
    int64_t k = gi * a.g;
    for (; k + 16 <= ke; k += 16) chunk(k, 0xffff, true);
    if (k < ke) chunk(k, mask16(ke - k), false);
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const int64_t gidx = rows[j] * a.G + gi;
      const __m512 s = _mm512_set1_ps(a.scale[gidx]);
      const __m512 z = _mm512_set1_ps(has_zp ? static_cast<float>(a.zp[gidx]) : 0.0f);
      #pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m512 t = has_zp ? _mm512_fnmadd_ps(z, xs[i], acc[i][j]) : acc[i][j];
        tot[i][j] = _mm512_fmadd_ps(s, t, tot[i][j]);
      }
    }
  }
  // Reduce with compile-time trip counts (a runtime bound over tot would make
  // GCC keep it in memory), then store the valid columns.
  float r[MR][NR];
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) r[i][j] = _mm512_reduce_add_ps(tot[i][j]);
  const int64_t nn = imin(nvalid, NR);
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nn; ++j) store_out(a, m0 + i, n0 + j, r[i][j]);
}

// MR x NR tile, int4 weights, against xs: rows of 2*ceil(K/32)*16 floats where
// each 32-element chunk is stored as its 16 even then its 16 odd elements
// (zero padded), i.e. in the order the low / high nibbles come out of 16 bytes.
template <int MR, int NR>
void stream_tile_s4(const WoArgs& a, const float* xs, int64_t ldxs, int64_t m0, int64_t n0) {
  const int64_t nvalid = a.N - n0;
  const uint8_t* w[NR];
  int64_t rows[NR];
  #pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    rows[j] = n0 + (j < nvalid ? j : nvalid - 1);
    w[j] = a.W + rows[j] * a.row_bytes;
  }
  __m512 acc[MR][NR];
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < a.G; ++gi) {
    __m512 tab[NR];
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) tab[j] = int4_table(a, rows[j], gi);
    const int64_t ke = (gi + 1) * a.g;
    // One 32-weight chunk at k (a multiple of 32: groups are, or G == 1):
    // bytes [k/2, k/2 + 16), masked to the row's ceil(K/2) bytes at the
    // tail.  Padding nibbles dequantize to finite values times x = 0.
    auto chunk = [&](int64_t k, __mmask16 bm, bool full) {
      __m512 xe[MR], xo[MR];
      #pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        xe[i] = _mm512_load_ps(xs + (m0 + i) * ldxs + k);
        xo[i] = _mm512_load_ps(xs + (m0 + i) * ldxs + k + 16);
      }
      #pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const __m128i b = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + k / 2))
                               : _mm_maskz_loadu_epi8(bm, w[j] + k / 2);
        const __m512i v = _mm512_cvtepu8_epi32(b);
        const __m512 lo = _mm512_permutexvar_ps(v, tab[j]);  // vpermps uses index bits 0..3
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab[j]);
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          acc[i][j] = _mm512_fmadd_ps(xe[i], lo, acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(xo[i], hi, acc[i][j]);
        }
      }
    };
    int64_t k = gi * a.g;
    for (; k + 32 <= ke; k += 32) chunk(k, 0xffff, true);
    if (k < ke) chunk(k, mask16((ke - k + 1) / 2), false);
  }
  float r[MR][NR];
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) r[i][j] = _mm512_reduce_add_ps(acc[i][j]);
  const int64_t nn = imin(nvalid, NR);
  #pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nn; ++j) store_out(a, m0 + i, n0 + j, r[i][j]);
}

template <int MR>
void stream_range(const WoArgs& a, const float* xs, int64_t ldxs, int64_t nb, int64_t ne) {
  constexpr int NR = MR == 1 ? 8 : 4;
  for (int64_t n0 = nb; n0 < ne; n0 += NR) {
    for (int64_t m0 = 0; m0 < a.M; m0 += MR) {
      const int64_t r = a.M - m0;
      if (a.bits == 8) {
        if (r >= MR) stream_tile_s8<MR, NR>(a, m0, n0);
        else if (r == 2) stream_tile_s8<2, NR>(a, m0, n0);
        else stream_tile_s8<1, NR>(a, m0, n0);
      } else {
        if (r >= MR) stream_tile_s4<MR, NR>(a, xs, ldxs, m0, n0);
        else if (r == 2) stream_tile_s4<2, NR>(a, xs, ldxs, m0, n0);
        else stream_tile_s4<1, NR>(a, xs, ldxs, m0, n0);
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
  if (bits != 8 && bits != 4) return false;
  const int64_t G = K / group_size;
  // Vector chunks (16 int8 / 32 int4 weights) must not straddle groups.
  if (G > 1 && group_size % (bits == 8 ? 16 : 32) != 0) return false;
  const WoArgs a{M, N, K, x, static_cast<const uint8_t*>(Wq), bits == 8 ? K : (K + 1) / 2,
                 bits, group_size, G, scale, zero_point, bias, out};

  // int4: split even / odd k of each 32-chunk of x once per call.
  const float* xs = nullptr;
  int64_t ldxs = 0;
  if (bits == 4) {
    ldxs = (K + 31) / 32 * 32;
    float* p = tl_xsplit.get<float>(static_cast<size_t>(M * ldxs));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < ldxs; ++k) {
        const int64_t c = k & ~int64_t(31), e = k & 31;  // destination lane e of chunk c
        const int64_t src = c + (e < 16 ? 2 * e : 2 * (e - 16) + 1);
        p[m * ldxs + k] = src < K ? x[m * K + src] : 0.0f;
      }
    xs = p;
  }

  // Weight rows are split among threads in blocks of 8 (a multiple of every
  // tile's row count), so tiles never straddle two threads.
  const int64_t blk = 8;
  const int64_t blocks = (N + blk - 1) / blk;
  int nt = num_threads;
  if (M * N * (K > 0 ? K : 1) < (int64_t{1} << 16)) nt = 1;
  if (nt > blocks) nt = static_cast<int>(blocks);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t nb = blocks * t / T * blk, ne = imin(N, blocks * (t + 1) / T * blk);
    if (nb < ne) {
      if (M == 1) {
        stream_range<1>(a, xs, ldxs, nb, ne);
      } else if (M == 2) {
        stream_range<2>(a, xs, ldxs, nb, ne);
      } else {
        stream_range<3>(a, xs, ldxs, nb, ne);
      }
    }
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
