// AVX2 weight-only GEMM: fp32 x int8 / packed 4-, 3-, 2-bit group-wise weights.
//
// Build: -mavx2 -mfma -mf16c -ffp-contract=off
//
// out[m, n] = sum_k x[m, k] * s[n, k/g] * (q[n, k] - z[n, k/g])  (+ bias[n])
//
// Two schedules, chosen by M (numbers: one Zen 3 core, hot weights, 1536x576
// and 576x1536, 2026-12-01; fp32 F.linear (MKL) reaches 57-93 GFLOP/s there):
//
// 1. M < 14, register tiles (vectors run along K).  A tile of MR activation
//    rows x NR weight rows keeps one 8-lane fp32 accumulator per output,
//    reduced horizontally once per K block.  Each weight chunk (8 values; 16
//    for 4-bit) is decoded once per tile in registers and used by the MR rows;
//    weights are never written back as fp32.  Tiles: M = 1: 1x4 (four
//    weight-row streams; bound by memory cold, by decode uops hot); M = 2, 3:
//    MRx4; M >= 4: 4x2 / 6x2 (12 accumulators + 2 weight vectors + 1 x
//    temporary of the 16 ymm; x is read from L1 as an FMA memory operand).
//    M = 1 folds the scale per group (acc = sum x * (q - z), tot += s * acc:
//    one vmulps less per weight vector, 2 x 4 accumulators fit): 31-35
//    GFLOP/s int8, 25 int4.  MR >= 2 multiplies each decoded vector by s once
//    for MR FMAs (the fold would need 2 x MR x NR accumulators): 59-71
//    GFLOP/s at M = 4..6.  Above one row tile, K is cut into blocks with
//    MR * KC * 4 <= 12 KB so the x rows stay in L1 while the 1-byte weights
//    stream (loop order per thread: K block, row tile, weight-row tile).
//
// 2. M >= 14, panels: a panel of 48 weight rows x 256 values is dequantized
//    once into a per-thread fp32 buffer (48 KB, L2), then multiplied with
//    every block of 16 (or a last 8) x rows by a broadcast micro-kernel: x is
//    packed transposed once per call, each weight broadcast from the buffer,
//    12 accumulators = 16 x 6 (8 x 12) outputs, 12 FMAs per 2 x loads + 6
//    broadcasts, as in an sgemm micro-kernel; the decode is spread over all M
//    rows instead of MR.  Measured 60-70 GFLOP/s at M = 14..24 (register
//    tiles: 50-60) and 82-86 at M = 128 (register tiles: 52-64, the
//    vmulps / loads cap them near 60 % of the FMA peak).  The x block of a K
//    step (256 x 16 floats = 16 KB) stays in L1 across the panel's tiles.
//
// Both produce exactly the reference's fp32 weight, s * float(q - z): q - z
// is formed in int32 (exact), converted, then multiplied by the group's
// scale (or, at M = 1, the scale multiplies the group's partial sum), so only
// the summation order differs from the PyTorch reference.
//
// Decode on 256-bit registers (Zen 3: FMA / FMUL on 2 of the 4 FP pipes,
// int ALU, shuffles and cvt on the others):
//  * int8: vpmovsxbd from memory, [vpsubd z], vcvtdq2ps.
//  * int4: the 8 bytes of 16 values are sign-extended to int32 lanes
//    (vpmovsxbd): v = 16 * q_hi + (q_lo & 15), so q_lo = v << 28 >> 28
//    (arithmetic) and v & ~15 = 16 * q_hi.  The high nibble is used as is
//    against x / 16 (a power of two: (x / 16) * (16 q) == x * q exactly), which
//    saves a shift; the low / high nibbles of a byte are elements 2i / 2i+1,
//    so x is copied once per call with each 16-element chunk stored as its 8
//    even, then its 8 odd (/ 16) elements.  The AVX-512 file's 16-entry table
//    lookup would need two vpermps + a blend per 8 weights here (vpermps
//    indexes 8 entries): more uops than and/shift + cvt.  The first version
//    (zero-extend, xor 0x88, and, shift, vmulps per vector, no fold) ran at
//    16 GFLOP/s at M = 1 against 25 now.
//  * 3- / 2-bit: the 24 / 16 bits of 8 codes are broadcast to 8 lanes,
//    shifted into place per lane (vpsrlvd by 3i / 2i) and masked.  Rows are
//    padded to 8 values, so a chunk never leaves its row.
//  Folding the zero-point too (sum x * q - z * sum x) would save the vpsubd
//  but cancels where the reference does not; it is not done.
//
// Any group size that divides K is handled, odd ones included: chunks sit on
// a fixed grid of multiples of 8 (16), and a chunk that straddles a group
// boundary (or the end of K) is processed once per group with the x lanes
// outside the group masked to zero (register tiles) or dequantized one value
// at a time (panels).  Nothing is declined to the scalar path; the cost of
// off-grid groups is the extra masked chunk per group.
//
// Internal linkage only and no std:: templates (see gemm_s8_avx512.cpp): an
// inline function instantiated here with AVX2 code must never be picked by the
// linker for a baseline translation unit.  For that reason quant_math.h is not
// included either.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

struct WoArgs {
  int64_t M, N, K;
  const uint8_t* W;  // row n at W + n * rb
  int64_t rb;        // packed row bytes
  int64_t g, G;      // group size, groups per row
  const float* scale;
  const int8_t* zp;
  const float* bias;
  float* out;
};

// Values per chunk (one 8-byte load of 4-bit codes holds 16).
template <int BITS> constexpr int kChunk = BITS == 4 ? 16 : 8;
// Offset added to the zero-point: the decoded integer is q itself for 8- and
// 4-bit and the offset code u = q - qmin for 2-, 3-bit, so q - z = u - (z - qmin).
template <int BITS> constexpr int kQOff = BITS >= 4 ? 0 : (1 << (BITS - 1));
// The offset is subtracted when there is a zero-point, and always for 2/3-bit.
template <int BITS, bool ZP> constexpr bool kSub = ZP || BITS < 4;

thread_local ThreadBuffer tl_x;  // x padded to whole chunks (4-bit: even / odd split)

// n < 8 bytes, rest zero: the chunk that runs past the end of a row (8- and
// 4-bit rows are not padded, and the last row may end the allocation).
inline __m128i load_partial8(const uint8_t* p, int64_t n) {
  uint64_t v = 0;
  std::memcpy(&v, p, static_cast<size_t>(n));
  return _mm_cvtsi64_si128(static_cast<long long>(v));
}

// Integer codes of the chunk of row `row` starting at value k (k on the chunk
// grid), in int32 lanes.  8-bit: c[0] = q[k + l].  4-bit: c[0] = q[k + 2l],
// c[1] = 16 * q[k + 2l + 1].  3-, 2-bit: c[0] = u[k + l] = q - qmin.
// tail: the chunk's bytes run past the row's rb bytes (8- and 4-bit only).
template <int BITS>
inline void codes(const uint8_t* row, int64_t k, int64_t rb, bool tail, __m256i* c) {
  if constexpr (BITS == 8) {
    const __m128i b = tail ? load_partial8(row + k, rb - k)
                           : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
    c[0] = _mm256_cvtepi8_epi32(b);
  } else if constexpr (BITS == 4) {
    // Sign-extended byte v = 16 * q_hi + (q_lo & 15): q_lo = v << 28 >> 28
    // (arithmetic), and v & ~15 = 16 * q_hi, used against x_odd / 16.
    const int64_t o = k >> 1;
    const __m128i b = tail ? load_partial8(row + o, rb - o)
                           : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + o));
    const __m256i v = _mm256_cvtepi8_epi32(b);
    c[0] = _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28);
    c[1] = _mm256_and_si256(v, _mm256_set1_epi32(~0xF));
  } else if constexpr (BITS == 2) {
    uint16_t s;
    std::memcpy(&s, row + (k >> 2), 2);
    const __m256i v = _mm256_set1_epi32(s);
    c[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                            _mm256_set1_epi32(3));
  } else {
    static_assert(BITS == 3, "bits");
    const uint8_t* p = row + (k >> 3) * 3;
    const uint32_t s = p[0] | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16);
    const __m256i v = _mm256_set1_epi32(static_cast<int>(s));
    c[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)),
                            _mm256_set1_epi32(7));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MR x NR tile over values [kb, ke) (kb on the chunk grid).  xs: x rows at
// stride ldx in chunk layout.  first: the first K block writes out (+ bias),
// later ones add.  Past-the-end weight rows repeat the last row; their
// results are dropped.  ZP: there are zero-points.
//
// MR = 1 (decode, bound by memory and by decode uops): the scale is folded
// per group, acc = sum x * (q - z) over the group, tot += s * acc, which
// saves one vmulps per weight vector; 2 x NR accumulators fit.  MR >= 2: the
// decoded vector is multiplied by s once and used by MR FMAs (the fold would
// need 2 x MR x NR accumulators, more than the 16 registers).
//
// The "#pragma GCC unroll" on the fixed-trip register-tile loops are needed
// (as in gemm_wo_avx512.cpp): without them GCC 12 keeps the accumulator
// arrays in memory.
template <int BITS, int MR, int NR, bool ZP>
void tile(const WoArgs& a, const float* xs, int64_t ldx, int64_t m0, int64_t n0, int64_t kb,
          int64_t ke, bool first) {
  constexpr int C = kChunk<BITS>, V = C / 8;
  constexpr bool FOLD = MR == 1;
  const int64_t nvalid = a.N - n0;
  const uint8_t* w[NR];
  int64_t rows[NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    rows[j] = n0 + (j < nvalid ? j : nvalid - 1);
    w[j] = a.W + rows[j] * a.rb;
  }
  const float* xr[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) xr[i] = xs + (m0 + i) * ldx;
  __m256 acc[MR][NR], tot[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = tot[i][j] = _mm256_setzero_ps();

  for (int64_t gi = kb / a.g; gi * a.g < ke; ++gi) {
    const int64_t gs = imax(gi * a.g, kb), ge = imin((gi + 1) * a.g, ke);
    __m256 sv[NR];
    __m256i ov[NR][V];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const int64_t idx = rows[j] * a.G + gi;
      sv[j] = _mm256_set1_ps(a.scale[idx]);
      const int o = (ZP ? a.zp[idx] : 0) + kQOff<BITS>;
      ov[j][0] = _mm256_set1_epi32(o);
      if constexpr (V == 2) ov[j][1] = _mm256_set1_epi32(16 * o);  // against 16 * q_hi
    }
    // One chunk: x of row i at xp[i] + xo (+ 8 for the odd half of 4-bit).
    auto chunk = [&](const float* const* xp, int64_t xo, int64_t k, bool tail) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        __m256i c[V];
        codes<BITS>(w[j], k, a.rb, tail, c);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) {
          __m256 wv = _mm256_cvtepi32_ps(kSub<BITS, ZP> ? _mm256_sub_epi32(c[v], ov[j][v]) : c[v]);
          if constexpr (!FOLD) wv = _mm256_mul_ps(wv, sv[j]);
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i)
            acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[i] + xo + 8 * v), wv, acc[i][j]);
        }
      }
    };
    // The chunk at k restricted to values [lo, hi): x lanes outside are zeroed
    // in a stack copy.  Rare: only at group boundaries off the chunk grid and
    // at the end of K.
    auto partial = [&](int64_t k, int64_t lo, int64_t hi) {
      alignas(32) float xm[MR][C];
      const float* xp[MR];
      const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo - k - 1));
      const __m256i vhi = _mm256_set1_epi32(static_cast<int>(hi - k));
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        // value index of each lane within the chunk
        const __m256i lane = BITS == 4 ? _mm256_add_epi32(_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
                                                          _mm256_set1_epi32(v))
                                       : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 keep = _mm256_castsi256_ps(
            _mm256_and_si256(_mm256_cmpgt_epi32(lane, vlo), _mm256_cmpgt_epi32(vhi, lane)));
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i)
          _mm256_store_ps(xm[i] + 8 * v, _mm256_and_ps(_mm256_loadu_ps(xr[i] + k + 8 * v), keep));
      }
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) xp[i] = xm[i];
      const bool tail = BITS == 8 ? k + 8 > a.rb : BITS == 4 ? (k >> 1) + 8 > a.rb : false;
      chunk(xp, 0, k, tail);
    };
    int64_t k = gs - gs % C;
    if (k < gs) {
      partial(k, gs, imin(ge, k + C));
      k += C;
    }
    for (; k + C <= ge; k += C) {
      // Decode (MR = 1) streams NR short weight rows at once from DRAM, which
      // the hardware prefetchers do not follow in time: each row's next cache
      // line in the next tile (NR rows on) is asked for when this tile's
      // chunk starts a line, as gemm_s8_avx2.cpp's M = 1 kernel once did (prefetches
      // never fault, so a reach past the matrix is harmless).
      if constexpr (FOLD) {
        const int64_t byte = k * BITS / 8;
        if ((byte & 63) < C * BITS / 8)
#pragma GCC unroll 8
          for (int j = 0; j < NR; ++j)
            _mm_prefetch(reinterpret_cast<const char*>(w[j] + NR * a.rb + byte), _MM_HINT_T0);
      }
      chunk(xr, k, k, false);
    }
    if (k < ge) partial(k, k, ge);
    if constexpr (FOLD) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) {
          tot[i][j] = _mm256_fmadd_ps(sv[j], acc[i][j], tot[i][j]);
          acc[i][j] = _mm256_setzero_ps();
        }
    }
  }

  float r[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) r[i][j] = hsum(FOLD ? tot[i][j] : acc[i][j]);
  const int64_t nn = imin(nvalid, NR);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* o = a.out + (m0 + i) * a.N + n0;
    for (int64_t j = 0; j < nn; ++j) {
      if (first)
        o[j] = a.bias != nullptr ? r[i][j] + a.bias[n0 + j] : r[i][j];
      else
        o[j] += r[i][j];
    }
  }
}

// Row tiles of fewer than MR rows (the M remainder), same NR.
template <int BITS, int MR, int NR, bool ZP>
void tile_rem(int64_t r, const WoArgs& a, const float* xs, int64_t ldx, int64_t m0, int64_t n0,
              int64_t kb, int64_t ke, bool first) {
  switch (r) {
    case 1: tile<BITS, 1, NR, ZP>(a, xs, ldx, m0, n0, kb, ke, first); break;
    case 2: if constexpr (MR > 2) tile<BITS, 2, NR, ZP>(a, xs, ldx, m0, n0, kb, ke, first); break;
    case 3: if constexpr (MR > 3) tile<BITS, 3, NR, ZP>(a, xs, ldx, m0, n0, kb, ke, first); break;
    case 4: if constexpr (MR > 4) tile<BITS, 4, NR, ZP>(a, xs, ldx, m0, n0, kb, ke, first); break;
    case 5: if constexpr (MR > 5) tile<BITS, 5, NR, ZP>(a, xs, ldx, m0, n0, kb, ke, first); break;
    default: break;
  }
}

// Weight-row tiles [t0, t1) (NR rows each) of one thread, all M rows.
template <int BITS, int MR, int NR, bool ZP>
void run_tiles(const WoArgs& a, const float* xs, int64_t ldx, int64_t KC, int64_t t0,
               int64_t t1) {
  for (int64_t kb = 0; kb < a.K; kb += KC) {
    const int64_t ke = imin(a.K, kb + KC);
    for (int64_t m0 = 0; m0 < a.M; m0 += MR) {
      const int64_t r = a.M - m0;
      for (int64_t t = t0; t < t1; ++t) {
        if (r >= MR)
          tile<BITS, MR, NR, ZP>(a, xs, ldx, m0, t * NR, kb, ke, kb == 0);
        else
          tile_rem<BITS, MR, NR, ZP>(r, a, xs, ldx, m0, t * NR, kb, ke, kb == 0);
      }
    }
  }
}

template <int BITS, int MR, int NR, bool ZP>
void run(const WoArgs& a, const float* xs, int64_t ldx, int nt) {
  constexpr int C = kChunk<BITS>;
  // One row tile: x is at most MR rows, read straight through K.  Otherwise K
  // blocks of MR * KC * 4 <= 12 KB of x (L1 is 32 KB).
  int64_t KC = a.K;
  if (a.M > MR) {
    const int64_t kc = imax(C, (12 * 1024 / (MR * 4)) / C * C);
    if (kc < a.K) KC = kc;
  }
  const int64_t tiles = (a.N + NR - 1) / NR;
  if (nt > tiles) nt = static_cast<int>(tiles);
  if (nt <= 1) {
    run_tiles<BITS, MR, NR, ZP>(a, xs, ldx, KC, 0, tiles);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t t0 = tiles * t / T, t1 = tiles * (t + 1) / T;
    if (t0 < t1) run_tiles<BITS, MR, NR, ZP>(a, xs, ldx, KC, t0, t1);
  }
}

template <int BITS, bool ZP>
void dispatch(const WoArgs& a, const float* xs, int64_t ldx, int nt) {
  if (a.M == 1) run<BITS, 1, 4, ZP>(a, xs, ldx, nt);
  else if (a.M == 2) run<BITS, 2, 4, ZP>(a, xs, ldx, nt);
  else if (a.M == 3) run<BITS, 3, 4, ZP>(a, xs, ldx, nt);
  else if (a.M == 4) run<BITS, 4, 2, ZP>(a, xs, ldx, nt);
  else run<BITS, 6, 2, ZP>(a, xs, ldx, nt);
}


// ---------------------------------------------------------------------------
// Panel schedule (larger M): dequantize once, multiply many times.
//
// At M >= kPanelMinM the in-register decode above is paid once per MR-row tile
// and its vmulps / loads keep the FMA pipes at ~60 % (measured).  Here a panel
// of kPanelN weight rows x kPanelK values is dequantized once into an fp32
// buffer (48 KB, L2; exactly the reference's s * (q - z)), then multiplied
// with every 16-row (or 8-row) block of x by a broadcast micro-kernel: x is
// packed transposed, 16 rows per K step in two vectors, each weight broadcast
// from the buffer, 12 accumulators = 16 x 6 outputs (or 8 x 12), i.e. 12 FMAs
// per 2 vector loads + 6 broadcasts: FMA-bound like an sgemm micro-kernel.
// The decode cost is spread over all M rows instead of MR.  The x block of a
// K step (kPanelK x 16 floats = 16 KB) stays in L1 across the panel's tiles.
// ---------------------------------------------------------------------------
constexpr int64_t kPanelMinM = 14;
constexpr int64_t kPanelN = 48;   // weight rows per panel (multiple of 6 and 12)
constexpr int64_t kPanelK = 256;  // values per K block (multiple of 16)

thread_local ThreadBuffer tl_wpanel;  // per thread: kPanelN x kPanelK fp32 weights
thread_local ThreadBuffer tl_xpack;   // x transposed in blocks of MB rows

// Value k of row `row` as a signed integer (scalar; panel edges only).
template <int BITS>
inline int code_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    return static_cast<int8_t>(row[k]);
  } else if constexpr (BITS == 4) {
    const int nib = (row[k >> 1] >> ((k & 1) * 4)) & 0xF;
    return nib >= 8 ? nib - 16 : nib;
  } else {
    const int64_t p = k * BITS;
    uint32_t w = row[p >> 3];
    if ((p & 7) + BITS > 8) w |= static_cast<uint32_t>(row[(p >> 3) + 1]) << 8;  // padded row
    return static_cast<int>((w >> (p & 7)) & ((1u << BITS) - 1u)) - (1 << (BITS - 1));
  }
}

// Dequantize rows [n0, n0 + kPanelN) (clamped: past-the-end rows repeat the
// last row) x values [kb, kb + kc) into wp[r * kPanelK + (k - kb)], in the
// chunk layout of x (4-bit: even / odd split, odd values x 16).  kc is ke - kb
// rounded up to the chunk; values past K are 0.
template <int BITS, bool ZP>
void decode_panel(const WoArgs& a, int64_t n0, int64_t kb, int64_t ke, float* wp) {
  constexpr int C = kChunk<BITS>, V = C / 8;
  // position p of a chunk holds value k + pos_value(p)
  auto pos_value = [](int p) -> int64_t { return BITS == 4 ? (p < 8 ? 2 * p : 2 * (p - 8) + 1) : p; };
  for (int64_t r = 0; r < kPanelN; ++r) {
    const int64_t row = imin(n0 + r, a.N - 1);
    const uint8_t* w = a.W + row * a.rb;
    float* dst = wp + r * kPanelK - kb;  // dst[k]: value k's slot
    // Group by group (no division per chunk: a 64-bit idiv per 8 values
    // measured 2x slower at M = 16).
    for (int64_t gi = kb / a.g; gi * a.g < ke; ++gi) {
      const int64_t gs = imax(gi * a.g, kb), ge = imin((gi + 1) * a.g, ke);
      const int64_t idx = row * a.G + gi;
      const float sf = a.scale[idx];
      const int z = ZP ? a.zp[idx] : 0;
      // Values [lo, hi) of the chunk at k, one at a time (chunks that straddle
      // a group boundary or the end of K).
      auto scalar = [&](int64_t k, int64_t lo, int64_t hi) {
        for (int p = 0; p < C; ++p) {
          const int64_t kk = k + pos_value(p);
          if (kk < lo || kk >= hi) continue;
          float val = sf * static_cast<float>(code_at<BITS>(w, kk) - z);
          if (BITS == 4 && p >= 8) val *= 16.0f;  // exact: against x_odd / 16
          dst[k + p] = val;
        }
      };
      const __m256 sv = _mm256_set1_ps(sf);
      const int o = z + kQOff<BITS>;
      int64_t k = gs - gs % C;
      if (k < gs) {
        scalar(k, gs, imin(ge, k + C));
        k += C;
      }
      for (; k + C <= ge; k += C) {
        __m256i c[V];
        codes<BITS>(w, k, a.rb, false, c);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) {
          const __m256i ov = _mm256_set1_epi32(v ? 16 * o : o);
          const __m256i q = kSub<BITS, ZP> ? _mm256_sub_epi32(c[v], ov) : c[v];
          _mm256_storeu_ps(dst + k + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(q), sv));
        }
      }
      if (k < ge) scalar(k, k, ge);
    }
    if (ke % C != 0) {  // slots of values past K in the last chunk: 0
      const int64_t k = ke - ke % C;
      for (int p = 0; p < C; ++p)
        if (k + pos_value(p) >= ke) dst[k + p] = 0.0f;
    }
  }
}

// MB x NB output tile over kc values: xp[k * MB + m], weights wp[j * kPanelK + k].
template <int MV, int NB>
void micro(const float* xp, const float* wp, int64_t kc, float* ct /* [NB][MV*8] */) {
  constexpr int MB = MV * 8;
  __m256 acc[MV][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MV; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    __m256 xv[MV];
#pragma GCC unroll 4
    for (int i = 0; i < MV; ++i) xv[i] = _mm256_load_ps(xp + k * MB + 8 * i);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      const __m256 b = _mm256_broadcast_ss(wp + j * kPanelK + k);
#pragma GCC unroll 4
      for (int i = 0; i < MV; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], b, acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 4
    for (int i = 0; i < MV; ++i) _mm256_store_ps(ct + j * MB + 8 * i, acc[i][j]);
}

// Output tile of one x block (MB = 8 * MV rows at xb) against the panel.
template <int MV, int NB>
void panel_block(const WoArgs& a, const float* xb, const float* wp, int64_t kc, int64_t m0,
                 int64_t n0, bool first) {
  constexpr int MB = MV * 8;
  alignas(32) float ct[NB * MB];
  const int64_t mm = imin(MB, a.M - m0);
  for (int64_t j0 = 0; j0 < kPanelN && n0 + j0 < a.N; j0 += NB) {
    micro<MV, NB>(xb, wp + j0 * kPanelK, kc, ct);
    const int64_t nn = imin(NB, a.N - n0 - j0);
    for (int64_t m = 0; m < mm; ++m) {
      float* o = a.out + (m0 + m) * a.N + n0 + j0;
      for (int64_t j = 0; j < nn; ++j) {
        const float v = ct[j * MB + m];
        if (first)
          o[j] = a.bias != nullptr ? v + a.bias[n0 + j0 + j] : v;
        else
          o[j] += v;
      }
    }
  }
}

// x blocks: M / 16 blocks of 16 rows, then the rest as one 16-row block, or as
// an 8-row block when at most 8 rows are left (M = 20: 16 + 8 instead of
// 16 + 16 with 12 empty rows; measured 50 -> 60 GFLOP/s on one core).
struct XBlocks {
  int64_t full16, rest;  // rest: 0, or rows in the last block
  bool rest8;
};

template <int BITS, bool ZP>
void panel_range(const WoArgs& a, const float* xpk, int64_t Kp, const XBlocks& xb, int64_t p0,
                 int64_t p1) {
  float* wp = tl_wpanel.get<float>(static_cast<size_t>(kPanelN * kPanelK));
  for (int64_t kb = 0; kb < a.K; kb += kPanelK) {
    const int64_t ke = imin(a.K, kb + kPanelK);
    const int64_t kc = imin(Kp, kb + kPanelK) - kb;  // chunk-padded length of this block
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelN;
      decode_panel<BITS, ZP>(a, n0, kb, ke, wp);
      for (int64_t b = 0; b < xb.full16 + (xb.rest && !xb.rest8); ++b)
        panel_block<2, 6>(a, xpk + b * Kp * 16 + kb * 16, wp, kc, b * 16, n0, kb == 0);
      if (xb.rest && xb.rest8)
        panel_block<1, 12>(a, xpk + xb.full16 * Kp * 16 + kb * 8, wp, kc, xb.full16 * 16, n0,
                           kb == 0);
    }
  }
}

template <int BITS, bool ZP>
void run_panels(const WoArgs& a, const float* xs, int64_t ldx, int nt) {
  // x packed transposed: a block of MB rows starting at row m0 holds
  // x[m0 + m, k] at [k * MB + m] over the chunk-padded K (rows past M are 0).
  const int64_t Kp = ldx;  // already a whole number of chunks
  const XBlocks xb{a.M / 16, a.M % 16, a.M % 16 != 0 && a.M % 16 <= 8};
  const int64_t nblk = xb.full16 + (xb.rest ? 1 : 0);
  float* xpk = tl_xpack.get<float>(static_cast<size_t>(nblk * Kp * 16));
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t MB = b == xb.full16 && xb.rest8 ? 8 : 16;
    float* dst = xpk + b * Kp * 16;
    for (int64_t m = 0; m < MB; ++m) {
      const int64_t row = b * 16 + m;
      if (row < a.M) {
        const float* src = xs + row * ldx;
        for (int64_t k = 0; k < Kp; ++k) dst[k * MB + m] = src[k];
      } else {
        for (int64_t k = 0; k < Kp; ++k) dst[k * MB + m] = 0.0f;
      }
    }
  }
  const int64_t panels = (a.N + kPanelN - 1) / kPanelN;
  if (nt > panels) nt = static_cast<int>(panels);
  if (nt <= 1) {
    panel_range<BITS, ZP>(a, xpk, Kp, xb, 0, panels);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t p0 = panels * t / T, p1 = panels * (t + 1) / T;
    if (p0 < p1) panel_range<BITS, ZP>(a, xpk, Kp, xb, p0, p1);
  }
}

template <int BITS>
void dispatch_bits(const WoArgs& a, const float* xs, int64_t ldx, int nt) {
  const bool zp = a.zp != nullptr;
  if (a.M >= kPanelMinM) {
    if (zp) run_panels<BITS, true>(a, xs, ldx, nt);
    else run_panels<BITS, false>(a, xs, ldx, nt);
  } else {
    if (zp) dispatch<BITS, true>(a, xs, ldx, nt);
    else dispatch<BITS, false>(a, xs, ldx, nt);
  }
}

}  // namespace

namespace detail {

bool gemm_weight_only_avx2(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq,
                           int bits, int64_t group_size, const float* scale,
                           const int8_t* zero_point, const float* bias, float* out,
                           int num_threads) {
  if (bits != 8 && bits != 4 && bits != 3 && bits != 2) return false;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = bias != nullptr ? bias[n] : 0.0f;
    return true;
  }
  const int64_t rb = bits == 8 ? K : bits == 4 ? (K + 1) / 2 : (K + 7) / 8 * bits;
  const WoArgs a{M, N, K, static_cast<const uint8_t*>(Wq), rb, group_size, K / group_size,
                 scale, zero_point, bias, out};
  const int64_t C = bits == 4 ? 16 : 8;
  // x is read in whole chunks: copied (zero padded) when K is off the chunk
  // grid, and always for 4-bit (even / odd split).  M * K floats, small next
  // to the M * N * K multiply.
  const float* xs = x;
  int64_t ldx = K;
  if (bits == 4 || K % C != 0) {
    ldx = (K + C - 1) / C * C;
    float* p = tl_x.get<float>(static_cast<size_t>(M * ldx));
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float* pr = p + m * ldx;
      if (bits == 4) {
        for (int64_t c = 0; c < ldx; c += 16)
          for (int e = 0; e < 8; ++e) {
            const int64_t k0 = c + 2 * e, k1 = k0 + 1;
            pr[c + e] = k0 < K ? xr[k0] : 0.0f;
            // odd elements meet 16 * q (see codes<4>): x / 16 is exact (a
            // power of two) and (x / 16) * (16 q) == x * q in fp32.
            pr[c + 8 + e] = k1 < K ? xr[k1] * 0.0625f : 0.0f;
          }
      } else {
        std::memcpy(pr, xr, static_cast<size_t>(K) * sizeof(float));
        for (int64_t k = K; k < ldx; ++k) pr[k] = 0.0f;
      }
    }
    xs = p;
  }
  int nt = num_threads;
  if (M * N * K < (int64_t{1} << 16)) nt = 1;
  switch (bits) {
    case 8: dispatch_bits<8>(a, xs, ldx, nt); break;
    case 4: dispatch_bits<4>(a, xs, ldx, nt); break;
    case 3: dispatch_bits<3>(a, xs, ldx, nt); break;
    default: dispatch_bits<2>(a, xs, ldx, nt); break;
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
