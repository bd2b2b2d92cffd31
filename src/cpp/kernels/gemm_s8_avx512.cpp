// AVX-512 VNNI u8 x s8 -> s32 GEMM with the fused epilogue.
//
// Build: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16
//        -mf16c -mfma -ffp-contract=off
//
// vpdpbusd multiplies unsigned bytes of one operand by signed bytes of the
// other and adds groups of 4 products into int32 lanes without intermediate
// saturation, so the sum is exact (|acc| <= 255*128*K < 2^31 for K <= 65536).
// A is unsigned (activations shifted by +128 by the caller, corrected in the
// epilogue through a_corr*b_sum), B the signed weights.
//
// Two kernels, chosen by M:
//  * small M ("dot"): each (m, n) output owns a zmm accumulator; A rows and
//    B rows are read straight from their row-major [.,K] layout 64 bytes at a
//    time and the 16 lanes are reduced at the end.  No packing: at small M the
//    op streams every weight byte once and is memory bound, so a packing pass
//    (read + write of all of B) would cost as much as the GEMM itself.
//  * large M ("packed"): B is repacked per thread into 64-column panels laid
//    out [K/4][64][4] (L2 resident), A dwords are broadcast and 6x4 zmm
//    accumulators hold a 6x64 tile: no horizontal reductions and the epilogue
//    works on full 16-column vectors.  The packing reads each weight byte once
//    per call, which is amortized over the M rows.
//  * pre-packed B (QLinear packs each layer once into that panel layout,
//    cpu_kernels.h "panel64"): the broadcast kernel at every M, the threads
//    splitting 16-column vectors up to one row block of M.
//
// Everything below except the two entry points has internal linkage, and no
// std:: templates are used: an inline function instantiated here with
// AVX-512 code must never be picked by the linker for a baseline TU.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm_s8_sink_avx512.h"
#include "llmeq/cpu_kernels.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

inline __mmask64 tail_mask64(int64_t n) {  // n in [0, 64]
  return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1);
}

// acc += a_u8 . b_s8 (vpdpbusd).  GCC 12 compiles _mm512_dpbusd_epi32 inside
// loops with a register copy and a stack spill of every accumulator per call
// (the microkernels ran at half speed); inline asm keeps the accumulators in
// registers.  Register operands only: with "vm" GCC folds the same B load
// into each of the MR instructions that use it (3x the loads).
inline __m512i dpbusd(__m512i acc, __m512i a_u8, __m512i b_s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a_u8), "v"(b_s8));
  return acc;
}

// Row r (0..3) of a 4x4 block held as lanes [4r, 4r+4) of a zmm.
template <int R>
inline __m128i lane128(__m512i v) {
  return _mm512_extracti32x4_epi32(v, R);
}
// Row r (0..3) of 16 packed uint16 values (4 per row).
inline __m128i row_u16(__m256i h, int r) {
  const __m128i half = (r & 2) ? _mm256_extracti128_si256(h, 1) : _mm256_castsi256_si128(h);
  return (r & 1) ? _mm_srli_si128(half, 8) : half;
}

// Finish a block of up to 4 rows x 4 columns held in one zmm: lane 4r + c is
// (row m0 + r, column n0 + c).  The epilogue math is lane-wise identical to
// sink_row; only the per-row / per-column operands are laid out differently.
inline void sink_4x4(const Sink& s, int64_t m0, int64_t n0, __m512i acc, int nrows, int64_t ncols) {
  const __mmask8 cm = static_cast<__mmask8>(tail_mask16(ncols < 4 ? ncols : 4));
  int64_t row[4];  // rows past nrows repeat the last one (their lanes are not stored)
  for (int r = 0; r < 4; ++r) row[r] = m0 + (r < nrows ? r : nrows - 1);
  if (s.ep == nullptr) {
    __m128i q[4] = {lane128<0>(acc), lane128<1>(acc), lane128<2>(acc), lane128<3>(acc)};
    for (int r = 0; r < nrows; ++r) _mm_mask_storeu_epi32(s.C + row[r] * s.ldc + n0, cm, q[r]);
    return;
  }
  const GemmEpilogue& e = *s.ep;
  if (e.a_corr != nullptr) {
    __m512i corr = _mm512_set1_epi32(e.a_corr[row[0] * e.a_corr_stride]);
    corr = _mm512_mask_set1_epi32(corr, 0x00f0, e.a_corr[row[1] * e.a_corr_stride]);
    corr = _mm512_mask_set1_epi32(corr, 0x0f00, e.a_corr[row[2] * e.a_corr_stride]);
    corr = _mm512_mask_set1_epi32(corr, 0xf000, e.a_corr[row[3] * e.a_corr_stride]);
    const __m512i bsum = _mm512_broadcast_i32x4(_mm_maskz_loadu_epi32(cm, e.b_sum + n0));
    acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(corr, bsum));
  }
  __m512 as = _mm512_set1_ps(1.0f);
  if (e.a_scale != nullptr) {
    as = _mm512_set1_ps(e.a_scale[row[0] * e.a_scale_stride]);
    as = _mm512_mask_mov_ps(as, 0x00f0, _mm512_set1_ps(e.a_scale[row[1] * e.a_scale_stride]));
    as = _mm512_mask_mov_ps(as, 0x0f00, _mm512_set1_ps(e.a_scale[row[2] * e.a_scale_stride]));
    as = _mm512_mask_mov_ps(as, 0xf000, _mm512_set1_ps(e.a_scale[row[3] * e.a_scale_stride]));
  }
  const __m512 bs = e.b_scale != nullptr ? _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(cm, e.b_scale + n0))
                                         : _mm512_set1_ps(1.0f);
  __m512 v = _mm512_mul_ps(_mm512_mul_ps(as, bs), _mm512_cvtepi32_ps(acc));
  if (e.bias != nullptr) v = _mm512_add_ps(v, _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(cm, e.bias + n0)));
  if (e.out_type == FloatType::F32) {
    const __m512i vi = _mm512_castps_si512(v);
    __m128i q[4] = {lane128<0>(vi), lane128<1>(vi), lane128<2>(vi), lane128<3>(vi)};
    float* out = static_cast<float*>(e.out);
    for (int r = 0; r < nrows; ++r)
      _mm_mask_storeu_ps(out + row[r] * e.ldo + n0, cm, _mm_castsi128_ps(q[r]));
    return;
  }
  const __m256i h = e.out_type == FloatType::BF16
                        ? cvt_bf16(v)
                        : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  uint16_t* out = static_cast<uint16_t*>(e.out);
  for (int r = 0; r < nrows; ++r) _mm_mask_storeu_epi16(out + row[r] * e.ldo + n0, cm, row_u16(h, r));
}

// ---------------------------------------------------------------------------
// Small-M "dot" kernel
// ---------------------------------------------------------------------------

// Lane sums of 16 vectors: lane i of the result = sum of the lanes of v[i].
// Interleave-and-add halves the lanes per vector at each of the 4 steps
// (45 instructions for 16 accumulators).
inline __m512i hsum16(const __m512i* v) {
  __m512i t[8], u[4];
  for (int p = 0; p < 8; ++p)
    t[p] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * p], v[2 * p + 1]),
                            _mm512_unpackhi_epi32(v[2 * p], v[2 * p + 1]));
  // u[q], 128-bit lane L: partial sums of v[4q..4q+3] (from lane L of each).
  for (int q = 0; q < 4; ++q)
    u[q] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * q], t[2 * q + 1]),
                            _mm512_unpackhi_epi64(t[2 * q], t[2 * q + 1]));
  const __m512i w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_i32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Lane sums of 4 vectors -> lanes 0..3 (upper lanes 0).
inline __m512i hsum4(const __m512i* v) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m512i w = _mm512_add_epi32(u, _mm512_shuffle_i32x4(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512i x = _mm512_add_epi32(w, _mm512_shuffle_i32x4(w, w, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_maskz_mov_epi32(0x000f, x);
}

// Dot kernel tile: MR (<= 6) rows of A x 4 rows of B.  24 accumulators + 6 A
// registers + 1 B register = 31 zmm; per 64-byte K step 10 loads feed 24
// vpdpbusd.  Measured against 3x8, 4x6, 4x4, 5x4 and 2x8 (M = 4..47, 1 and 2
// threads): 6x4 was best or tied, and 4-column tiles reduce cheaply as 4x4
// blocks (hsum16).
constexpr int kDotNR = 4;
constexpr int kDotMR = 6;

// PF: also prefetch the B tile that follows (pf, pf_valid rows) into L2, one
// line per row per K step; done by the first row tile of each B tile.  With
// weights coming from DRAM the 4 demand streams alone leave the kernel latency
// bound; measured (2 threads, weights rotated through 3 copies): M = 1
// 4096x4096 ~33 -> ~50 GB/s, M = 16 ~15 -> ~17 GB/s, hot (L3) unchanged.
// (T1 and T2 hints measured equal, T0 worse at M = 1.)
template <int MR, bool PF>
inline void dot_tile(const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t nvalid,
                     int64_t K, const Sink& sink, int64_t m0, int64_t n0, const int8_t* pf,
                     int64_t pf_valid) {
  // Rows past the end of B repeat the last valid row (results are not stored):
  // keeps the inner loop free of row masks.
  const int8_t* b[kDotNR];
  const int8_t* p[kDotNR];
  for (int j = 0; j < kDotNR; ++j) {
    b[j] = B + (j < nvalid ? j : nvalid - 1) * ldb;
    p[j] = PF ? pf + (j < pf_valid ? j : pf_valid - 1) * ldb : nullptr;
  }
  // Padded to whole 4-row blocks; the padding rows stay zero.
  constexpr int MB = (MR + 3) / 4 * 4;
  __m512i acc[MB][kDotNR];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < kDotNR; ++j) acc[i][j] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512i a[MR];
    for (int i = 0; i < MR; ++i) a[i] = _mm512_loadu_si512(A + i * lda + k);
    for (int j = 0; j < kDotNR; ++j) {
      if (PF) _mm_prefetch(reinterpret_cast<const char*>(p[j] + k), _MM_HINT_T1);
      const __m512i bv = _mm512_loadu_si512(b[j] + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = dpbusd(acc[i][j], a[i], bv);
    }
  }
  if (k < K) {  // masked tail: zero bytes contribute nothing, nothing read past a row
    const __mmask64 km = tail_mask64(K - k);
    __m512i a[MR];
    for (int i = 0; i < MR; ++i) a[i] = _mm512_maskz_loadu_epi8(km, A + i * lda + k);
    for (int j = 0; j < kDotNR; ++j) {
      const __m512i bv = _mm512_maskz_loadu_epi8(km, b[j] + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = dpbusd(acc[i][j], a[i], bv);
    }
  }
  if (MR == 1) {
    sink_row(sink, m0, n0, hsum4(acc[0]), tail_mask16(imin(nvalid, kDotNR)));
    return;
  }
  for (int r0 = 0; r0 < MR; r0 += 4)
    sink_4x4(sink, m0 + r0, n0, hsum16(&acc[r0][0]), MR - r0 < 4 ? MR - r0 : 4, nvalid);
}

// A row tile of R rows (1..6); the first row tile of a B tile prefetches the next one.
template <int R>
inline void dot_rows(const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t nvalid,
                     int64_t K, const Sink& sink, int64_t m0, int64_t n0, const int8_t* pf,
                     int64_t pf_valid) {
  if (pf != nullptr) {
    dot_tile<R, true>(A, lda, B, ldb, nvalid, K, sink, m0, n0, pf, pf_valid);
  } else {
    dot_tile<R, false>(A, lda, B, ldb, nvalid, K, sink, m0, n0, nullptr, 0);
  }
}

// One thread's share: columns [n_begin, n_end), all M rows.  B tiles outer,
// row tiles inner: a B tile comes from memory once per call and is re-read
// from L1/L2 by the other row tiles; A (M*K bytes, M small) stays in L2.
// No K blocking: blocking K so that a B tile stays in L1 needs a reduction
// and a scratch round trip per block, and measured slower for every Kc tried
// (512..2048) at M = 16 and 47.
void dot_range(int64_t M, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
               int64_t n_begin, int64_t n_end, const Sink& sink) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kDotNR) {
    const int64_t nv = imin(kDotNR, n_end - n0);
    const int8_t* bt = B + n0 * ldb;
    const int64_t pf_valid = imin(kDotNR, n_end - n0 - kDotNR);
    const int8_t* next = pf_valid > 0 ? bt + kDotNR * ldb : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += kDotMR) {
      const uint8_t* a = A + m0 * lda;
      const int8_t* pf = m0 == 0 ? next : nullptr;
      switch (imin(kDotMR, M - m0)) {
        case 6: dot_rows<6>(a, lda, bt, ldb, nv, K, sink, m0, n0, pf, pf_valid); break;
        case 5: dot_rows<5>(a, lda, bt, ldb, nv, K, sink, m0, n0, pf, pf_valid); break;
        case 4: dot_rows<4>(a, lda, bt, ldb, nv, K, sink, m0, n0, pf, pf_valid); break;
        case 3: dot_rows<3>(a, lda, bt, ldb, nv, K, sink, m0, n0, pf, pf_valid); break;
        case 2: dot_rows<2>(a, lda, bt, ldb, nv, K, sink, m0, n0, pf, pf_valid); break;
        default: dot_rows<1>(a, lda, bt, ldb, nv, K, sink, m0, n0, pf, pf_valid); break;
      }
    }
  }
}


// ---------------------------------------------------------------------------
// Large-M "packed" kernel
// ---------------------------------------------------------------------------
constexpr int kPanel = 64;  // columns per packed panel = 4 zmm of int32
constexpr int kPackMR = 6;  // 6 x 4 accumulators + 4 B + 1 broadcast = 29 zmm

// Transpose a 16x16 matrix of dwords in place (r[i] = row i).
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4q + c], 128-bit lane l, holds rows 4q..4q+3 of column 4l + c.
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
    r[c] = _mm512_shuffle_i32x4(v0, v2, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + c] = _mm512_shuffle_i32x4(v0, v2, _MM_SHUFFLE(3, 1, 3, 1));
    r[4 + c] = _mm512_shuffle_i32x4(v1, v3, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Pack columns [n0, n0 + nvalid) of B into dst[k4][64][4] (k4 < ceil(K/4)).
// Missing columns and the bytes past K are zero, so the kernel needs no masks
// on B.
void pack_panel(const int8_t* B, int64_t ldb, int64_t nvalid, int64_t K, uint8_t* dst) {
  const int64_t K4 = (K + 3) / 4;
  for (int g = 0; g < kPanel / 16; ++g) {
    for (int64_t kc = 0; kc < K; kc += 64) {
      const __mmask64 km = tail_mask64(K - kc);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = g * 16 + i;
        r[i] = n < nvalid ? _mm512_maskz_loadu_epi8(km, B + n * ldb + kc) : _mm512_setzero_si512();
      }
      transpose16(r);
      const int64_t k4_0 = kc / 4, cnt = imin(16, K4 - k4_0);
      for (int64_t j = 0; j < cnt; ++j)
        _mm512_store_si512(dst + ((k4_0 + j) * kPanel + g * 16) * 4, r[j]);
    }
  }
}

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// MR rows of A x NJ 16-column vectors of one packed panel, full K.  Bp
// points at the first of those vectors in k4-row 0; k4-rows are kPanel * 4
// bytes apart whatever NJ is (a thread's column range may start or end inside
// a panel).  Unaligned loads: a pre-packed panel is a tensor's storage.
// Weights to prefetch into L2 while a tile runs: `lines` 64-byte lines of
// k4-row k4 of the panel slice at p, for the k4 = phase, phase + period, ...
// (row tile `phase` of `period` takes every period-th row, so a slice's row
// tiles together fetch the next slice once, spread over their whole run).
struct Prefetch {
  const uint8_t* p = nullptr;
  int lines = 0;
  int64_t phase = 0, period = 1;
};

template <int MR, int NJ>
inline void packed_tile(const uint8_t* A, int64_t lda, const uint8_t* Bp, int64_t K,
                        const Sink& sink, int64_t m0, int64_t n0, int64_t nvalid, Prefetch pf = {}) {
  __m512i acc[MR][NJ];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_si512();
  const int64_t K4 = K / 4;
  int64_t pf_next = pf.p != nullptr ? pf.phase : K4;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const uint8_t* bp = Bp + k4 * (kPanel * 4);
    if (k4 == pf_next) {
      for (int j = 0; j < pf.lines; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(pf.p + k4 * (kPanel * 4) + 64 * j), _MM_HINT_T1);
      pf_next += pf.period;
    }
    __m512i b[NJ];
    for (int j = 0; j < NJ; ++j) b[j] = _mm512_loadu_si512(bp + 64 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32(load_u32(A + i * lda + 4 * k4));
      for (int j = 0; j < NJ; ++j) acc[i][j] = dpbusd(acc[i][j], a, b[j]);
    }
  }
  if (K4 * 4 < K) {  // last 1..3 bytes of each A row: masked load, never past the row
    const __mmask16 km = static_cast<__mmask16>((1u << (K - K4 * 4)) - 1u);
    const uint8_t* bp = Bp + K4 * (kPanel * 4);
    __m512i b[NJ];
    for (int j = 0; j < NJ; ++j) b[j] = _mm512_loadu_si512(bp + 64 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_broadcastd_epi32(_mm_maskz_loadu_epi8(km, A + i * lda + 4 * K4));
      for (int j = 0; j < NJ; ++j) acc[i][j] = dpbusd(acc[i][j], a, b[j]);
    }
  }
  for (int j = 0; j < NJ; ++j) {
    const int64_t cols = nvalid - 16 * j;
    if (cols <= 0) break;
    const __mmask16 nm = tail_mask16(cols);
    for (int i = 0; i < MR; ++i) sink_row(sink, m0 + i, n0 + 16 * j, acc[i][j], nm);
  }
}

// Rows [m_begin, m_end) x NJ vectors of one panel, in row tiles of kPackMR.
// next / next_lines: the slice to prefetch while these rows run (null: none).
template <int NJ>
void packed_rows(const uint8_t* A, int64_t lda, const uint8_t* Bp, int64_t K, const Sink& sink,
                 int64_t m_begin, int64_t m_end, int64_t n0, int64_t nvalid, const uint8_t* next = nullptr,
                 int next_lines = 0) {
  Prefetch pf;
  pf.p = next;
  pf.lines = next_lines;
  pf.period = (m_end - m_begin + kPackMR - 1) / kPackMR;
  int64_t m = m_begin;
  for (; m + kPackMR <= m_end; m += kPackMR, ++pf.phase)
    packed_tile<kPackMR, NJ>(A + m * lda, lda, Bp, K, sink, m, n0, nvalid, pf);
  const uint8_t* a = A + m * lda;
  switch (m_end - m) {
    case 5: packed_tile<5, NJ>(a, lda, Bp, K, sink, m, n0, nvalid, pf); break;
    case 4: packed_tile<4, NJ>(a, lda, Bp, K, sink, m, n0, nvalid, pf); break;
    case 3: packed_tile<3, NJ>(a, lda, Bp, K, sink, m, n0, nvalid, pf); break;
    case 2: packed_tile<2, NJ>(a, lda, Bp, K, sink, m, n0, nvalid, pf); break;
    case 1: packed_tile<1, NJ>(a, lda, Bp, K, sink, m, n0, nvalid, pf); break;
    default: break;
  }
}

thread_local ThreadBuffer tl_panel;

// Rows per work unit of the packed path: a unit is (panel, block of rows).
// Large enough that the per-unit overhead is nil, small enough to balance
// two threads when there are few panels (N = 768 -> 12 panels).
constexpr int64_t kPackMBlock = 384;

void packed_gemm(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B,
                 int64_t ldb, const Sink& sink, int nt) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t mblocks = (M + kPackMBlock - 1) / kPackMBlock;
  const int64_t units = panels * mblocks;
  if (nt > units) nt = static_cast<int>(units);
  const size_t panel_bytes = static_cast<size_t>((K + 3) / 4) * kPanel * 4 + 64;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    // Contiguous unit range in panel-major order: each thread packs a panel
    // once and then sweeps its row blocks.
    const int64_t u0 = units * t / T, u1 = units * (t + 1) / T;
    uint8_t* buf = tl_panel.get<uint8_t>(panel_bytes);
    int64_t packed = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t p = u / mblocks, mb = u % mblocks;
      const int64_t n0 = p * kPanel, nv = imin(kPanel, N - n0);
      if (p != packed) {
        pack_panel(B + n0 * ldb, ldb, nv, K, buf);
        packed = p;
      }
      packed_rows<4>(A, lda, buf, K, sink, mb * kPackMBlock, imin(M, (mb + 1) * kPackMBlock), n0, nv);
    }
  }
}

// M <= 16 never packs B: at decode sizes the op streams every weight byte once
// and is memory bound, so a packing pass over all of B would cost as much as
// the product.  Above that the crossover depends on K (the dot kernel's
// per-output reduction is amortized over K/64 steps).  Measured, 2 threads,
// GOP/s packed vs dot: K = 768: M = 16 630 vs 530, M = 24 725 vs 555;
// 4096x4096: M = 24 660 vs 780, M = 32 690 vs 600, M = 48 720 vs 600;
// K = 11008: about equal from M = 32 on.
constexpr int64_t kPackMinM = 32;
constexpr int64_t kPackMinMSmallK = 17;
constexpr int64_t kSmallK = 2048;

void gemm_impl(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B,
               int64_t ldb, const Sink& sink, int nt) {
  // Parallel regions cost a few microseconds; tiny products run on one thread.
  if (M * N * imax(K, 1) < (int64_t{1} << 16)) nt = 1;
  if (M >= kPackMinM || (M >= kPackMinMSmallK && K < kSmallK)) {
    packed_gemm(M, N, K, A, lda, B, ldb, sink, nt);
    return;
  }
  // Split N into one contiguous range per thread (multiples of the tile).
  const int64_t tiles = (N + kDotNR - 1) / kDotNR;
  if (nt > tiles) nt = static_cast<int>(tiles);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t n_begin = tiles * t / T * kDotNR;
    const int64_t n_end = imin(N, tiles * (t + 1) / T * kDotNR);
    dot_range(M, K, A, lda, B, ldb, n_begin, n_end, sink);
  }
}

// ---------------------------------------------------------------------------
// Pre-packed B (cpu_kernels.h "panel64", packed once per layer by QLinear):
// every M takes the broadcast kernel, with no packing pass per call and no
// per-output lane reductions (the dot kernel's cost at M = 2..31).
// ---------------------------------------------------------------------------

// Columns vectors [v0, v1) of 16 (all M rows): a panel at a time, a slice of
// one where the range starts or ends inside it.
void prepacked_cols(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const uint8_t* B,
                    int64_t v0, int64_t v1, const Sink& sink) {
  const int64_t pstride = s8_panel_bytes(K);
  for (int64_t v = v0; v < v1;) {
    const int64_t p = v / 4, j0 = v % 4, j1 = imin(4, v1 - p * 4);
    const int64_t n0 = p * kPanel + j0 * 16, nv = imin(N - n0, (j1 - j0) * 16);
    const uint8_t* b = B + p * pstride + j0 * 64;
    // With several row tiles, this thread's next slice (the next panel, from
    // its column 0) is fetched into L2 while this one runs, so the weight
    // stream from memory does not stop while the later row tiles re-read the
    // current slice from L2.  Measured, 2 threads, weights cold: M = 16
    // 4096x4096 16.5 -> 23 GB/s, 3072x768 14 -> 19; with one row tile
    // (M <= 6) the hardware prefetcher alone was as fast or faster.
    const int next_lines = M > kPackMR ? static_cast<int>(imin(4, v1 - (p + 1) * 4)) : 0;
    const uint8_t* next = next_lines > 0 ? B + (p + 1) * pstride : nullptr;
    switch (j1 - j0) {
      case 4: packed_rows<4>(A, lda, b, K, sink, 0, M, n0, nv, next, next_lines); break;
      case 3: packed_rows<3>(A, lda, b, K, sink, 0, M, n0, nv, next, next_lines); break;
      case 2: packed_rows<2>(A, lda, b, K, sink, 0, M, n0, nv, next, next_lines); break;
      default: packed_rows<1>(A, lda, b, K, sink, 0, M, n0, nv, next, next_lines); break;
    }
    v = p * 4 + j1;
  }
}

void prepacked_gemm(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* Bp,
                    const Sink& sink, int nt) {
  if (M * N * imax(K, 1) < (int64_t{1} << 16)) nt = 1;
  const uint8_t* B = reinterpret_cast<const uint8_t*>(Bp);
  if (M <= kPackMBlock) {
    // Decode and short prompts: the threads split the 16-column vectors, so
    // a layer of a few panels (N = 192: 3) still feeds every thread; each
    // thread's weights come from memory once and are re-read from L2 by its
    // further row tiles.
    const int64_t vecs = (N + 15) / 16;
    if (nt > vecs) nt = static_cast<int>(vecs);
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      prepacked_cols(M, N, K, A, lda, B, vecs * t / T, vecs * (t + 1) / T, sink);
    }
    return;
  }
  // Long inputs: (panel, row block) units in panel-major order, as packed_gemm.
  const int64_t pstride = s8_panel_bytes(K);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t mblocks = (M + kPackMBlock - 1) / kPackMBlock;
  const int64_t units = panels * mblocks;
  if (nt > units) nt = static_cast<int>(units);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    for (int64_t u = units * t / T, u1 = units * (t + 1) / T; u < u1; ++u) {
      const int64_t p = u / mblocks, mb = u % mblocks;
      const int64_t n0 = p * kPanel, nv = imin(kPanel, N - n0);
      packed_rows<4>(A, lda, B + p * pstride, K, sink, mb * kPackMBlock, imin(M, (mb + 1) * kPackMBlock), n0, nv);
    }
  }
}

}  // namespace

namespace detail {

void gemm_u8s8_avx512(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                      const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                      const GemmEpilogue* ep, int num_threads) {
  const Sink sink{C, ldc, ep};
  gemm_impl(M, N, K, A, lda, B, ldb, sink, num_threads);
}

void gemm_u8s8_prepacked_avx512(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                                const int8_t* Bp, int32_t* C, int64_t ldc, const GemmEpilogue* ep,
                                int num_threads) {
  const Sink sink{C, ldc, ep};
  prepacked_gemm(M, N, K, A, lda, Bp, sink, num_threads);
}

void row_sums_s8_avx512(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                        int num_threads) {
  // dpbusd with an all-ones unsigned operand sums 4 signed bytes per lane, exactly.
  const __m512i ones = _mm512_set1_epi8(1);
  const bool par = num_threads > 1 && N * K >= (int64_t{1} << 20);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* b = B + n * ldb;
    __m512i acc = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) acc = dpbusd(acc, ones, _mm512_loadu_si512(b + k));
    if (k < K) acc = dpbusd(acc, ones, _mm512_maskz_loadu_epi8(tail_mask64(K - k), b + k));
    out[n] = _mm512_reduce_add_epi32(acc);
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
