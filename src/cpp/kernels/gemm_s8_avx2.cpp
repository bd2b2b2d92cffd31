// AVX2 u8 x s8 -> s32 GEMM with the fused epilogue (CPUs without AVX-512 VNNI).
//
// Build: -mavx2 -mfma -mf16c -ffp-contract=off
//
// Exactness.  vpmaddubsw (u8 * s8 pairs into s16) is the instruction fbgemm
// uses, but it saturates: 255 * 127 * 2 > 32767.  fbgemm lives with that by
// quantizing activations to 7 bits (torch's reduce_range on x86), which costs
// accuracy.  We keep 8-bit activations and an exact product instead: A is
// widened to s16 once per block (zero-extend), each B byte is sign-extended as
// it is loaded, and vpmaddwd adds pairs of s16 products into s32 lanes:
// |pair| <= 2 * 255 * 128 = 65280, and vpmaddwd saturates only when both
// products of a pair are -32768 * -32768 (A >= 0 rules that out).  The peak is
// the same as vpmaddubsw + vpmaddwd(ones): one multiply-port instruction per
// 16 products; what we pay extra is one sign-extension per B vector (amortized
// over the 3 A rows) and one vpaddd per vpmaddwd.
//
// Two kernels, chosen by M (both on the canonical row-major [N, K] weights;
// the caller's layout is never changed):
//  * small M ("dot", M < kPanelMinM): dot-product form, no packing: at
//    decode-sized M the op streams every weight byte once and is memory
//    bound, and a pack pass (read + write of all of B) would cost as much as
//    the GEMM.  A 4 x 3 micro-kernel: 12 ymm accumulators of 8 partial sums,
//    3 ymm of sign-extended B (1 vpmovsxbw per 4 vpmaddwd), A read as the
//    memory operand of vpmaddwd.  At the end of a K block the accumulators of
//    a row are reduced (vphaddd) into one xmm of 3 sums.
//  * large M ("panel"): per task and K block, 16 B rows are widened and
//    transposed once into a panel laid out [K/2][16][2] s16 (L1/L2), A pairs
//    (a[k], a[k+1]) are broadcast as one dword, and a 6 x 16 micro-kernel
//    keeps 12 ymm accumulators that each hold 8 finished columns: no
//    horizontal reductions, and the epilogue works on 8-column vectors.  The
//    pack costs ~0.3 instruction per weight byte, amortized over the task's
//    kMC rows.
// Both split the work into tasks of (kMC rows of A) x (a chunk of columns);
// a task walks K in kKC blocks: it widens its A rows into a thread buffer
// (zero-padded to a multiple of 16 values, so no micro-kernel branches on
// K), and K blocks after the first add into an int32 tile of the task; the
// last one applies the epilogue.  B rows are never read past K.
//
// Internal linkage only and no std:: templates, for the same reason as in
// gemm_s8_avx512.cpp.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

constexpr int kMR = 4;           // dot kernel: A rows per micro-kernel
constexpr int kNR = 3;           // dot kernel: B rows (output columns) per micro-kernel
constexpr int kPR = 6;           // panel kernel: A rows per micro-kernel
constexpr int kPN = 16;          // panel kernel: columns per panel
constexpr int64_t kPanelMinM = 32;  // the panel kernel from this M on (measured: bench_kernels)
constexpr int64_t kKC = 2048;    // K block: multiple of 16
constexpr int64_t kDotWholeRowBytes = 512 << 10;  // dot kernel: whole rows while the widened A fits this
constexpr int64_t kMC = 48;      // rows per task: multiple of kMR and kPR; widened A block 192 KiB
constexpr int64_t kPartLd = 256;  // row stride of the int32 partial sums, >= columns per task + 8

// Where finished sums go: raw C, or the epilogue.
struct Sink {
  int32_t* C;
  int64_t ldc;
  const GemmEpilogue* ep;
};

// fp32 -> bf16, round-to-nearest-even with integer ops; NaN -> quiet NaN with
// the sign and top payload bits kept.  Lane-wise identical to f32_to_bf16.
inline __m128i cvt_bf16(__m128 v) {
  const __m128i x = _mm_castps_si128(v);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(1));
  const __m128i rounded = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(x, _mm_set1_epi32(0x7fff)), lsb), 16);
  const __m128i quiet = _mm_or_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(0x40));
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
  return _mm_blendv_epi8(rounded, quiet, nan);  // 32-bit lanes holding 16-bit values
}

// Load the per-column values of columns n..n+nv-1 into lanes 0..nv-1.  Four
// lanes are read straight from p when they lie inside the N-long array (the
// extra lane is ignored); only the last columns of the matrix go through a
// zero-padded copy.
inline __m128i load_cols(const void* p, int64_t nv, bool room4) {
  if (room4) return _mm_loadu_si128(static_cast<const __m128i*>(p));
  int32_t t[4] = {0, 0, 0, 0};
  std::memcpy(t, p, static_cast<size_t>(nv) * 4);
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(t));
}
// Store lanes 0..nv-1 (nv in 1..3) of 32-bit values, nothing past them: the
// next column may belong to another thread's task.
inline void store_cols32(void* p, __m128i v, int64_t nv) {
  if (nv >= 2) {
    _mm_storel_epi64(static_cast<__m128i*>(p), v);
    if (nv == 3) *reinterpret_cast<int32_t*>(static_cast<char*>(p) + 8) = _mm_extract_epi32(v, 2);
  } else {
    *static_cast<int32_t*>(p) = _mm_cvtsi128_si32(v);
  }
}
// Same for 16-bit values in lanes 0..nv-1 of h.
inline void store_cols16(uint16_t* p, __m128i h, int64_t nv) {
  if (nv >= 2) {
    *reinterpret_cast<int32_t*>(p) = _mm_cvtsi128_si32(h);
    if (nv == 3) p[2] = static_cast<uint16_t>(_mm_extract_epi16(h, 2));
  } else {
    p[0] = static_cast<uint16_t>(_mm_extract_epi16(h, 0));
  }
}

// Finish the sums of row m, columns n..n+nv-1 (nv in 1..3; N columns in all).
// Same IEEE ops in the same order as the scalar path: int32 correction
// (wrap-around), then (a_scale * b_scale) * float(acc), then + bias.
inline void sink3(const Sink& s, int64_t m, int64_t n, int64_t N, __m128i acc, int64_t nv) {
  if (s.ep == nullptr) {
    store_cols32(s.C + m * s.ldc + n, acc, nv);
    return;
  }
  const GemmEpilogue& e = *s.ep;
  const bool room4 = n + 4 <= N;
  if (e.a_corr != nullptr) {
    const __m128i corr = _mm_set1_epi32(e.a_corr[m * e.a_corr_stride]);
    acc = _mm_sub_epi32(acc, _mm_mullo_epi32(corr, load_cols(e.b_sum + n, nv, room4)));
  }
  const __m128 as = _mm_set1_ps(e.a_scale != nullptr ? e.a_scale[m * e.a_scale_stride] : 1.0f);
  const __m128 bs = e.b_scale != nullptr ? _mm_castsi128_ps(load_cols(e.b_scale + n, nv, room4)) : _mm_set1_ps(1.0f);
  __m128 v = _mm_mul_ps(_mm_mul_ps(as, bs), _mm_cvtepi32_ps(acc));
  if (e.bias != nullptr) v = _mm_add_ps(v, _mm_castsi128_ps(load_cols(e.bias + n, nv, room4)));
  switch (e.out_type) {
    case FloatType::F32:
      store_cols32(static_cast<float*>(e.out) + m * e.ldo + n, _mm_castps_si128(v), nv);
      break;
    case FloatType::BF16:
      store_cols16(static_cast<uint16_t*>(e.out) + m * e.ldo + n,
                   _mm_packus_epi32(cvt_bf16(v), _mm_setzero_si128()), nv);
      break;
    case FloatType::F16:
      store_cols16(static_cast<uint16_t*>(e.out) + m * e.ldo + n,
                   _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), nv);
      break;
  }
}

// Lane sums of 4 vectors: lane j of the result = sum of the 8 lanes of v[j].
inline __m128i hsum4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Widen A[rows, k0 .. k0+kc) (u8, stride lda) to s16 rows of kc16 values
// (kc rounded up to 16, zero-padded), row stride kc16.
void widen_a(const uint8_t* A, int64_t lda, int64_t rows, int64_t kc, int64_t kc16, int16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* a = A + r * lda;
    int16_t* d = dst + r * kc16;
    int64_t k = 0;
    for (; k + 16 <= kc; k += 16)
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + k),
                         _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k))));
    for (; k < kc; ++k) d[k] = a[k];
    for (; k < kc16; ++k) d[k] = 0;
  }
}

// acc += vpmaddwd(src1, src2), through the scratch register tmp: the two
// instructions of every product in the micro-kernels' inline asm.
#define MADD_ACC(src1, src2, tmp, acc) \
  "vpmaddwd " src1 ", " src2 ", " tmp "\n\t" \
  "vpaddd " tmp ", %[" acc "], %[" acc "]\n\t"

// B rows of one micro-kernel call at the current K block: nfull values are
// read straight from the rows, the (< 16) values after them from tail (3 x 16
// zero-padded bytes) — so no load ever crosses the end of a B row.
struct BRows {
  const int8_t* row[3];
  int64_t nfull;
  const int8_t* tail;
};

// 4 rows x 3 columns, the hot loop.  Inline asm keeps the 12 accumulators in
// ymm0-11 (with intrinsics GCC 12 copied and spilled them every step: half
// speed); ymm12 is the product, ymm13-15 the sign-extended B values.  A is
// read as the memory operand of vpmaddwd (no register needed, no extra uop).
inline void micro4(const int16_t* a, int64_t kc16, const BRows& b, __m128i* out) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
  __m256i c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  const int16_t* a0 = a;
  const int16_t* a1 = a + kc16;
  // Rows 2 and 3 are addressed as rows 0 and 1 + 2 * ld (asm operands are
  // capped at 30, the accumulators take 24 of them).
  const int64_t ld = kc16 * 2;  // bytes
  auto step = [&](const int8_t* b0, const int8_t* b1, const int8_t* b2, int64_t k) {
    __asm__(
        "vpmovsxbw (%[b0]), %%ymm13\n\t"
        "vpmovsxbw (%[b1]), %%ymm14\n\t"
        "vpmovsxbw (%[b2]), %%ymm15\n\t"
        MADD_ACC("(%[p0])", "%%ymm13", "%%ymm12", "c00")
        MADD_ACC("(%[p0])", "%%ymm14", "%%ymm12", "c01")
        MADD_ACC("(%[p0])", "%%ymm15", "%%ymm12", "c02")
        MADD_ACC("(%[p1])", "%%ymm13", "%%ymm12", "c10")
        MADD_ACC("(%[p1])", "%%ymm14", "%%ymm12", "c11")
        MADD_ACC("(%[p1])", "%%ymm15", "%%ymm12", "c12")
        MADD_ACC("(%[p0],%[ld],2)", "%%ymm13", "%%ymm12", "c20")
        MADD_ACC("(%[p0],%[ld],2)", "%%ymm14", "%%ymm12", "c21")
        MADD_ACC("(%[p0],%[ld],2)", "%%ymm15", "%%ymm12", "c22")
        MADD_ACC("(%[p1],%[ld],2)", "%%ymm13", "%%ymm12", "c30")
        MADD_ACC("(%[p1],%[ld],2)", "%%ymm14", "%%ymm12", "c31")
        MADD_ACC("(%[p1],%[ld],2)", "%%ymm15", "%%ymm12", "c32")
        : [c00] "+x"(c00), [c01] "+x"(c01), [c02] "+x"(c02), [c10] "+x"(c10), [c11] "+x"(c11),
          [c12] "+x"(c12), [c20] "+x"(c20), [c21] "+x"(c21), [c22] "+x"(c22), [c30] "+x"(c30),
          [c31] "+x"(c31), [c32] "+x"(c32)
        : [p0] "r"(a0 + k), [p1] "r"(a1 + k), [ld] "r"(ld), [b0] "r"(b0), [b1] "r"(b1), [b2] "r"(b2)
        : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
  };
  int64_t k = 0;
  for (; k < b.nfull; k += 16) step(b.row[0] + k, b.row[1] + k, b.row[2] + k, k);
  if (k < kc16) step(b.tail, b.tail + 16, b.tail + 32, k);
  const __m256i z = _mm256_setzero_si256();
  out[0] = hsum4(c00, c01, c02, z);
  out[1] = hsum4(c10, c11, c12, z);
  out[2] = hsum4(c20, c21, c22, z);
  out[3] = hsum4(c30, c31, c32, z);
}

// 1 or 2 rows x 3 columns (M tails and decode-sized M): few enough
// accumulators that the compiler keeps them in registers.
template <int MR>
inline void micro_small(const int16_t* a, int64_t kc16, const BRows& b, __m128i* out) {
  __m256i c[MR][3];
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = c[i][2] = _mm256_setzero_si256();
  auto step = [&](const int8_t* p0, const int8_t* p1, const int8_t* p2, int64_t k) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)));
    const __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p2)));
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(a + i * kc16 + k));
      c[i][0] = _mm256_add_epi32(c[i][0], _mm256_madd_epi16(x, w0));
      c[i][1] = _mm256_add_epi32(c[i][1], _mm256_madd_epi16(x, w1));
      c[i][2] = _mm256_add_epi32(c[i][2], _mm256_madd_epi16(x, w2));
    }
  };
  int64_t k = 0;
  for (; k < b.nfull; k += 16) step(b.row[0] + k, b.row[1] + k, b.row[2] + k, k);
  if (k < kc16) step(b.tail, b.tail + 16, b.tail + 32, k);
  for (int i = 0; i < MR; ++i) out[i] = hsum4(c[i][0], c[i][1], c[i][2], _mm256_setzero_si256());
}

// 1 row x 3 columns for M = 1 (decode), one weight row after the other:
// rows are contiguous, so a task's columns are read as one sequential stream
// (the best case for the hardware prefetchers), with a software prefetch
// kDecodePrefetch bytes down that stream.  Why not interleave rows (more independent
// accumulators)?  Decode is bound by DRAM bandwidth, not by the multiply
// ports, and interleaved rows are as many short streams: K = 576 rows are nine
// cache lines each, over before the prefetchers ramp up.  Measured on a Zen 3
// VM, 2 threads, 150 MB of weights (2026-12-03): six rows interleaved read
// 10.5-13 GB/s (13-17 with a prefetch of the next six rows), one row at a
// time 16-18 GB/s and 19-22 GB/s with a prefetch 2 KiB ahead, as fast as a
// plain float sum over the same bytes (17-19 GB/s).  Exact int32 sums: the
// order of the columns changes nothing.
constexpr int64_t kDecodePrefetch = 2048;

inline __m128i micro1_seq(const int16_t* a, int64_t kc16, const BRows& b) {
  __m256i c[kNR];
  for (int j = 0; j < kNR; ++j) {
    const int8_t* p = b.row[j];
    __m256i acc = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k < b.nfull; k += 16) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + k + kDecodePrefetch), _MM_HINT_T0);
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(a + k)),
                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                                        reinterpret_cast<const __m128i*>(p + k)))));
    }
    if (k < kc16)
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(a + k)),
                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                                        reinterpret_cast<const __m128i*>(b.tail + 16 * j)))));
    c[j] = acc;
  }
  return hsum4(c[0], c[1], c[2], _mm256_setzero_si256());
}

thread_local ThreadBuffer tl_abuf;  // per thread: widened A block, kMC x K block s16
thread_local ThreadBuffer tl_part;  // per thread: int32 sums of the K blocks so far, kMC x kPartLd
thread_local ThreadBuffer tl_panel;  // per thread: one B panel, kKC/2 x kPN s16 pairs

// One dot-kernel task: rows [m0, m0+mr) x columns [n0, n0+nc), all of K.
void dot_task(int64_t m0, int64_t mr, int64_t n0, int64_t nc, int64_t N, int64_t K, int64_t kblock,
              const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb, const Sink& sink, int16_t* abuf,
              int32_t* part) {
  const int64_t nkb = K == 0 ? 1 : (K + kblock - 1) / kblock;
  alignas(16) int8_t btail[kNR * 16];
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t k0 = kb * kblock, kc = imin(kblock, K - k0), kc16 = round_up(kc, 16);
    const bool first = kb == 0, last = kb == nkb - 1;
    widen_a(A + m0 * lda + k0, lda, mr, kc, kc16, abuf);
    const int64_t nfull = kc / 16 * 16;
    // The B rows of columns n.. at this K block (tail: a zero-padded copy of
    // their last kc - nfull values); columns past N repeat the last valid row
    // (their sums are dropped).
    auto rows_at = [&](int64_t n, int8_t* tail) {
      BRows b;
      b.nfull = nfull;
      b.tail = tail;
      const int64_t nv = imin(kNR, N - n);
      for (int j = 0; j < kNR; ++j) b.row[j] = B + (n + (j < nv ? j : nv - 1)) * ldb + k0;
      if (nfull < kc16) {
        std::memset(tail, 0, kNR * 16);
        for (int j = 0; j < kNR; ++j) std::memcpy(tail + 16 * j, b.row[j] + nfull, static_cast<size_t>(kc - nfull));
      }
      return b;
    };
    auto finish = [&](int64_t i, int64_t jn, __m128i s) {  // row m0 + i, columns n0 + jn ..
      int32_t* p = part + i * kPartLd + jn;
      if (!first) s = _mm_add_epi32(s, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      if (last) {
        sink3(sink, m0 + i, n0 + jn, N, s, imin(kNR, N - n0 - jn));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), s);
      }
    };
    int64_t jn = 0;
    if (mr == 1) {  // decode: one sequential stream of weight rows
      for (; jn < nc; jn += kNR) finish(0, jn, micro1_seq(abuf, kc16, rows_at(n0 + jn, btail)));
    }
    for (; jn < nc; jn += kNR) {
      const BRows b = rows_at(n0 + jn, btail);
      for (int64_t i = 0; i < mr; i += kMR) {
        const int64_t rows = imin(kMR, mr - i);
        __m128i s[kMR];
        const int16_t* a = abuf + i * kc16;
        if (rows == 4) {
          micro4(a, kc16, b, s);
        } else if (rows == 3) {
          micro_small<2>(a, kc16, b, s);
          micro_small<1>(a + 2 * kc16, kc16, b, s + 2);
        } else if (rows == 2) {
          micro_small<2>(a, kc16, b, s);
        } else {
          micro_small<1>(a, kc16, b, s);
        }
        for (int64_t r = 0; r < rows; ++r) finish(i + r, jn, s[r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Panel kernel (large M)
// ---------------------------------------------------------------------------

inline __m256 cvt_bf16_lanes(__m256 v, __m256i* out) {  // 8 lanes, as cvt_bf16
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  *out = _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return v;
}

// Lanes 0..nv-1 set (nv in 0..8), as a vpmaskmov mask.
inline __m256i lane_mask(int64_t nv) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nv)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Finish the sums of row m, columns n..n+nv-1 (nv in 1..8; N columns in all);
// lane-wise the same ops as sink3.  Partial vectors use vpmaskmov: masked-off
// lanes are neither read (no fault past the arrays) nor written (the next
// column may be another thread's).
inline void sink8(const Sink& s, int64_t m, int64_t n, __m256i acc, int64_t nv) {
  const bool full = nv == 8;
  const __m256i mask = lane_mask(nv);
  auto load = [&](const void* p) {
    return full ? _mm256_loadu_si256(static_cast<const __m256i*>(p))
                : _mm256_maskload_epi32(static_cast<const int*>(p), mask);
  };
  if (s.ep == nullptr) {
    int32_t* c = s.C + m * s.ldc + n;
    if (full) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), acc);
    } else {
      _mm256_maskstore_epi32(c, mask, acc);
    }
    return;
  }
  const GemmEpilogue& e = *s.ep;
  if (e.a_corr != nullptr) {
    const __m256i corr = _mm256_set1_epi32(e.a_corr[m * e.a_corr_stride]);
    acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(corr, load(e.b_sum + n)));
  }
  const __m256 as = _mm256_set1_ps(e.a_scale != nullptr ? e.a_scale[m * e.a_scale_stride] : 1.0f);
  const __m256 bs = e.b_scale != nullptr ? _mm256_castsi256_ps(load(e.b_scale + n)) : _mm256_set1_ps(1.0f);
  __m256 v = _mm256_mul_ps(_mm256_mul_ps(as, bs), _mm256_cvtepi32_ps(acc));
  if (e.bias != nullptr) v = _mm256_add_ps(v, _mm256_castsi256_ps(load(e.bias + n)));
  if (e.out_type == FloatType::F32) {
    float* o = static_cast<float*>(e.out) + m * e.ldo + n;
    if (full) {
      _mm256_storeu_ps(o, v);
    } else {
      _mm256_maskstore_ps(o, mask, v);
    }
    return;
  }
  __m128i h;
  if (e.out_type == FloatType::BF16) {
    __m256i r;
    cvt_bf16_lanes(v, &r);
    // 16-bit values in 32-bit lanes -> 8 packed u16 (packus works per 128-bit half).
    h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  } else {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  uint16_t* o = static_cast<uint16_t*>(e.out) + m * e.ldo + n;
  if (full) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), h);
  } else {
    uint16_t t[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(t), h);
    std::memcpy(o, t, static_cast<size_t>(nv) * 2);
  }
}

// Pack B rows n..n+nv-1 (nv <= 16; missing rows are zeros), K values
// [k0, k0+kc), into panel[p][j] = (B[n+j][k0+2p], B[n+j][k0+2p+1]) as an s16
// pair (one dword), p < kc16/2, zero-padded past kc.  8 rows at a time: each
// row's 16 values are sign-extended into one ymm of 8 pairs and an 8 x 8
// dword transpose turns 8 rows of pairs into 8 pair-rows of 8 columns.
void pack_panel(const int8_t* B, int64_t ldb, int64_t nv, int64_t kc, int64_t kc16, int32_t* panel) {
  for (int half = 0; half < 2; ++half) {
    const int64_t j0 = half * 8;
    const int8_t* rows[8];
    for (int j = 0; j < 8; ++j) rows[j] = j0 + j < nv ? B + (j0 + j) * ldb : nullptr;
    for (int64_t k = 0; k < kc16; k += 16) {
      __m256i r[8];
      for (int j = 0; j < 8; ++j) {
        if (rows[j] == nullptr) {
          r[j] = _mm256_setzero_si256();
        } else if (k + 16 <= kc) {
          r[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + k)));
        } else {  // the last, partial 16 values of the row: zero-padded copy
          alignas(16) int8_t t[16] = {0};
          std::memcpy(t, rows[j] + k, static_cast<size_t>(kc - k));
          r[j] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
        }
      }
      const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
      const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
      const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
      const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
      const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
      // u_q, 128-bit half h: pair 4h + q of rows 0..3 (u0..u3) / rows 4..7 (u4..u7).
      int32_t* d = panel + (k / 2) * kPN + j0;
      const __m256i* us[4][2] = {{&u0, &u4}, {&u1, &u5}, {&u2, &u6}, {&u3, &u7}};
      for (int q = 0; q < 4; ++q) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(d + q * kPN), _mm256_permute2x128_si256(*us[q][0], *us[q][1], 0x20));
        _mm256_store_si256(reinterpret_cast<__m256i*>(d + (q + 4) * kPN), _mm256_permute2x128_si256(*us[q][0], *us[q][1], 0x31));
      }
    }
  }
}

// 6 rows x 16 columns over npairs K pairs: a = widened A (row stride kc16
// values), panel as packed above.  Inline asm keeps the 12 accumulators in
// ymm0-11 (see micro4); ymm12/13 hold the panel's two 8-column halves,
// ymm14 the broadcast A pair, ymm15 the product.
inline void micro6(const int16_t* a, int64_t kc16, const int32_t* panel, int64_t npairs, __m256i* c) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const int64_t ld = kc16 * 2;  // bytes between A rows; rows 1, 2 / 4, 5 as base + ld * {1, 2}
  const char* pa = reinterpret_cast<const char*>(a);
  const char* pa3 = pa + 3 * ld;
  const char* pb = reinterpret_cast<const char*>(panel);
  for (int64_t p = 0; p < npairs; ++p, pa += 4, pa3 += 4, pb += 4 * kPN) {
    __asm__(
        "vmovdqa (%[pb]), %%ymm12\n\t"
        "vmovdqa 32(%[pb]), %%ymm13\n\t"
        "vpbroadcastd (%[pa]), %%ymm14\n\t"
        MADD_ACC("%%ymm12", "%%ymm14", "%%ymm15", "c00")
        MADD_ACC("%%ymm13", "%%ymm14", "%%ymm15", "c01")
        "vpbroadcastd (%[pa],%[ld],1), %%ymm14\n\t"
        MADD_ACC("%%ymm12", "%%ymm14", "%%ymm15", "c10")
        MADD_ACC("%%ymm13", "%%ymm14", "%%ymm15", "c11")
        "vpbroadcastd (%[pa],%[ld],2), %%ymm14\n\t"
        MADD_ACC("%%ymm12", "%%ymm14", "%%ymm15", "c20")
        MADD_ACC("%%ymm13", "%%ymm14", "%%ymm15", "c21")
        "vpbroadcastd (%[pa3]), %%ymm14\n\t"
        MADD_ACC("%%ymm12", "%%ymm14", "%%ymm15", "c30")
        MADD_ACC("%%ymm13", "%%ymm14", "%%ymm15", "c31")
        "vpbroadcastd (%[pa3],%[ld],1), %%ymm14\n\t"
        MADD_ACC("%%ymm12", "%%ymm14", "%%ymm15", "c40")
        MADD_ACC("%%ymm13", "%%ymm14", "%%ymm15", "c41")
        "vpbroadcastd (%[pa3],%[ld],2), %%ymm14\n\t"
        MADD_ACC("%%ymm12", "%%ymm14", "%%ymm15", "c50")
        MADD_ACC("%%ymm13", "%%ymm14", "%%ymm15", "c51")
        : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20),
          [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41),
          [c50] "+x"(c50), [c51] "+x"(c51)
        : [pa] "r"(pa), [pa3] "r"(pa3), [ld] "r"(ld), [pb] "r"(pb)
        : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
  }
  c[0] = c00, c[1] = c01, c[2] = c10, c[3] = c11, c[4] = c20, c[5] = c21;
  c[6] = c30, c[7] = c31, c[8] = c40, c[9] = c41, c[10] = c50, c[11] = c51;
}

// 1..5 rows (the M tail of a task): few enough accumulators for intrinsics.
template <int MR>
inline void micro_panel_small(const int16_t* a, int64_t kc16, const int32_t* panel, int64_t npairs,
                              __m256i* c) {
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < npairs; ++p) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + p * kPN));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + p * kPN + 8));
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * kc16 + 2 * p, 4);
      const __m256i x = _mm256_set1_epi32(pair);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(x, b0));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(x, b1));
    }
  }
  for (int i = 0; i < MR; ++i) c[2 * i] = acc[i][0], c[2 * i + 1] = acc[i][1];
}

inline void micro_panel(int64_t rows, const int16_t* a, int64_t kc16, const int32_t* panel,
                        int64_t npairs, __m256i* c) {
  switch (rows) {
    case 6: micro6(a, kc16, panel, npairs, c); break;
    case 5: micro_panel_small<5>(a, kc16, panel, npairs, c); break;
    case 4: micro_panel_small<4>(a, kc16, panel, npairs, c); break;
    case 3: micro_panel_small<3>(a, kc16, panel, npairs, c); break;
    case 2: micro_panel_small<2>(a, kc16, panel, npairs, c); break;
    default: micro_panel_small<1>(a, kc16, panel, npairs, c); break;
  }
}

// One panel-kernel task: rows [m0, m0+mr) x columns [n0, n0+nc), all of K.
void panel_task(int64_t m0, int64_t mr, int64_t n0, int64_t nc, int64_t N, int64_t K, const uint8_t* A,
                int64_t lda, const int8_t* B, int64_t ldb, const Sink& sink, int16_t* abuf, int32_t* part,
                int32_t* panel) {
  const int64_t nkb = K == 0 ? 1 : (K + kKC - 1) / kKC;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t k0 = kb * kKC, kc = imin(kKC, K - k0), kc16 = round_up(kc, 16);
    const bool first = kb == 0, last = kb == nkb - 1;
    widen_a(A + m0 * lda + k0, lda, mr, kc, kc16, abuf);
    for (int64_t jn = 0; jn < nc; jn += kPN) {
      const int64_t n = n0 + jn, nv = imin(kPN, N - n);
      pack_panel(B + n * ldb + k0, ldb, nv, kc, kc16, panel);
      for (int64_t i = 0; i < mr; i += kPR) {
        const int64_t rows = imin(kPR, mr - i);
        __m256i c[2 * kPR];
        micro_panel(rows, abuf + i * kc16, kc16, panel, kc16 / 2, c);
        for (int64_t r = 0; r < rows; ++r) {
          for (int h = 0; h < 2; ++h) {
            const int64_t nh = nv - 8 * h;  // valid columns of this half
            if (nh <= 0) break;
            int32_t* pp = part + (i + r) * kPartLd + jn + 8 * h;
            __m256i v = c[2 * r + h];
            if (!first) v = _mm256_add_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pp)));
            if (last) {
              sink8(sink, m0 + i + r, n + 8 * h, v, nh < 8 ? nh : 8);
            } else {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp), v);
            }
          }
        }
      }
    }
  }
}

#undef MADD_ACC

}  // namespace

namespace detail {

void gemm_u8s8_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                    const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                    const GemmEpilogue* ep, int num_threads) {
  const Sink sink{C, ldc, ep};
  const bool panel = M >= kPanelMinM;
  const int64_t unit = panel ? kPN : kNR;  // columns per micro-kernel
  const int64_t nmb = (M + kMC - 1) / kMC;
  // Enough tasks for every thread when M is small: split the columns finer
  // (in whole micro-kernel widths), at most 255 a task (the partial tile).
  const int64_t max_nc = (kPartLd - 1) / unit * unit;
  const int64_t want_nb = imax(imax(1, (4 * num_threads + nmb - 1) / nmb), (N + max_nc - 1) / max_nc);
  const int64_t nc = imin(max_nc, round_up((N + want_nb - 1) / want_nb, unit));
  const int64_t nnb = (N + nc - 1) / nc;
  const int64_t tasks = nmb * nnb;
  // K block.  The dot kernel streams whole B rows when its widened A rows fit
  // in L2 (decode-sized M): cutting rows into kKC pieces turns one sequential
  // read of each weight row into several short ones (measured 2x slower at
  // M = 1 on 4096 x 11008, weights from DRAM).
  const int64_t rows = imin(M, kMC);
  const int64_t kblock = !panel && rows * round_up(K, 16) * 2 <= kDotWholeRowBytes ? imax(round_up(K, 16), 16) : kKC;
  const int64_t kc16 = round_up(imin(K, kblock), 16);
  const bool par = num_threads > 1 && tasks > 1 && M * N * K >= (int64_t{1} << 16);
#pragma omp parallel num_threads(num_threads) if (par)
  {
    int16_t* abuf = tl_abuf.get<int16_t>(static_cast<size_t>(rows * imax(kc16, 16)));
    int32_t* part = tl_part.get<int32_t>(static_cast<size_t>(kMC * kPartLd));
    int32_t* pbuf = panel ? tl_panel.get<int32_t>(static_cast<size_t>(imax(kc16, 16) / 2 * kPN)) : nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t mb = t / nnb, nb = t % nnb;
      const int64_t m0 = mb * kMC, n0 = nb * nc, mr = imin(kMC, M - m0), ncols = imin(nc, N - n0);
      if (panel) {
        panel_task(m0, mr, n0, ncols, N, K, A, lda, B, ldb, sink, abuf, part, pbuf);
      } else {
        dot_task(m0, mr, n0, ncols, N, K, kblock, A, lda, B, ldb, sink, abuf, part);
      }
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
