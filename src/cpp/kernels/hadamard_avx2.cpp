// AVX2 Walsh-Hadamard transform (hadamard.cpp has the scalar path and the
// semantics).
//
// Build: -mavx2 -mfma -mf16c -ffp-contract=off
//
// Per row, in a per-thread fp32 buffer y (n floats, L1 / L2 resident), block
// by block of p:
//  1. load + convert 8 values, the first three butterfly stages (h = 1, 2, 4)
//     inside the ymm (lane permute / 128-bit swap, add, sub, blend), store;
//  2. the stages h = 8 .. p/2 in passes over y, two stages per pass (four
//     vectors at offsets 0, h, 2h, 3h), a last single-stage pass when the
//     count is odd: a radix-4 pass reads and writes y once for two stages;
//  3. had given: out[a, b] = scale * sum_c had[a, c] y[c, b], 4 output blocks
//     x 16 columns of accumulators (8 ymm) per step, so every y vector loaded
//     feeds 4 FMAs; no had: out = scale * y. Convert and store.
// Each butterfly is the scalar path's (u + v, u - v) on the same operands,
// and the cross-block sum keeps its order (first product, then c = 1, 2, ...),
// with had * y + acc fused: bit-identical to scalar for +-1 matrices.
#include <immintrin.h>

#include <cstdint>

#include "llmeq/cpu_kernels.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

thread_local ThreadBuffer t_buf;

template <FloatType T>
inline __m256 load8(const void* x, int64_t i) {
  if constexpr (T == FloatType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (T == FloatType::BF16)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else
      return _mm256_cvtph_ps(h);
  }
}

// fp32 -> bf16 / fp16 round to nearest even; bf16 NaN -> quiet NaN with sign
// and top payload kept: lane-wise quant_math.h f32_to_bf16 (as gemm_s8_avx2).
template <FloatType T>
inline void store8(void* o, int64_t i, __m256 v) {
  if constexpr (T == FloatType::F32) {
    _mm256_storeu_ps(static_cast<float*>(o) + i, v);
  } else {
    __m128i h;
    if constexpr (T == FloatType::BF16) {
      const __m256i x = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
      const __m256i rounded =
          _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
      const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
      const __m256i r = _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      // 16-bit values in 32-bit lanes -> 8 u16 (packus works per 128-bit half)
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(o) + i), h);
  }
}

// Stages h = 1, 2, 4 of 8 consecutive values. s holds each lane's partner;
// the lower lane of a pair keeps v + s = u + v, the upper one s - v = u - v.
inline __m256 stages_1_2_4(__m256 v) {
  __m256 s = _mm256_permute_ps(v, 0xB1);  // swap neighbours
  v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
  s = _mm256_permute_ps(v, 0x4E);  // swap pairs within 128-bit halves
  v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
  s = _mm256_permute2f128_ps(v, v, 0x01);  // swap halves
  return _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
}

// Stages h and 2h (4h <= p) over the block of p floats at y.
inline void radix4_pass(float* y, int64_t p, int64_t h) {
  for (int64_t j = 0; j < p; j += 4 * h)
    for (int64_t i = j; i < j + h; i += 8) {
      const __m256 a = _mm256_loadu_ps(y + i), b = _mm256_loadu_ps(y + i + h);
      const __m256 c = _mm256_loadu_ps(y + i + 2 * h), d = _mm256_loadu_ps(y + i + 3 * h);
      const __m256 a1 = _mm256_add_ps(a, b), b1 = _mm256_sub_ps(a, b);
      const __m256 c1 = _mm256_add_ps(c, d), d1 = _mm256_sub_ps(c, d);
      _mm256_storeu_ps(y + i, _mm256_add_ps(a1, c1));
      _mm256_storeu_ps(y + i + 2 * h, _mm256_sub_ps(a1, c1));
      _mm256_storeu_ps(y + i + h, _mm256_add_ps(b1, d1));
      _mm256_storeu_ps(y + i + 3 * h, _mm256_sub_ps(b1, d1));
    }
}

inline void radix2_pass(float* y, int64_t p, int64_t h) {
  for (int64_t j = 0; j < p; j += 2 * h)
    for (int64_t i = j; i < j + h; i += 8) {
      const __m256 a = _mm256_loadu_ps(y + i), b = _mm256_loadu_ps(y + i + h);
      _mm256_storeu_ps(y + i, _mm256_add_ps(a, b));
      _mm256_storeu_ps(y + i + h, _mm256_sub_ps(a, b));
    }
}

// Output blocks a0 .. a0+3, columns b .. b+8 (TWO: b .. b+16); y's blocks
// are ps floats apart. The accumulators are named variables, not an array
// (GCC kept an array of them on the stack: a store per FMA), and the tile is
// not inlined: inside the row loop GCC spilled the loop counters to the stack
// (n = 576: 2.2 -> 1.6 us per row, one shared Zen 3 core).
template <FloatType T, bool TWO>
__attribute__((noinline)) void cross_tile4(const float* y, int64_t ps, const float* had, int64_t m, int64_t p,
                                           int64_t a0, int64_t b, __m256 vs, void* out) {
  const float* h = had + a0 * m;
  __m256 y0 = _mm256_loadu_ps(y + b), y1 = TWO ? _mm256_loadu_ps(y + b + 8) : y0;
  __m256 w = _mm256_broadcast_ss(h);
  __m256 c00 = _mm256_mul_ps(w, y0), c01 = _mm256_mul_ps(w, y1);
  w = _mm256_broadcast_ss(h + m);
  __m256 c10 = _mm256_mul_ps(w, y0), c11 = _mm256_mul_ps(w, y1);
  w = _mm256_broadcast_ss(h + 2 * m);
  __m256 c20 = _mm256_mul_ps(w, y0), c21 = _mm256_mul_ps(w, y1);
  w = _mm256_broadcast_ss(h + 3 * m);
  __m256 c30 = _mm256_mul_ps(w, y0), c31 = _mm256_mul_ps(w, y1);
  for (int64_t c = 1; c < m; ++c) {
    const float* yc = y + c * ps + b;
    y0 = _mm256_loadu_ps(yc);
    if (TWO) y1 = _mm256_loadu_ps(yc + 8);
    w = _mm256_broadcast_ss(h + c);
    c00 = _mm256_fmadd_ps(w, y0, c00);
    if (TWO) c01 = _mm256_fmadd_ps(w, y1, c01);
    w = _mm256_broadcast_ss(h + m + c);
    c10 = _mm256_fmadd_ps(w, y0, c10);
    if (TWO) c11 = _mm256_fmadd_ps(w, y1, c11);
    w = _mm256_broadcast_ss(h + 2 * m + c);
    c20 = _mm256_fmadd_ps(w, y0, c20);
    if (TWO) c21 = _mm256_fmadd_ps(w, y1, c21);
    w = _mm256_broadcast_ss(h + 3 * m + c);
    c30 = _mm256_fmadd_ps(w, y0, c30);
    if (TWO) c31 = _mm256_fmadd_ps(w, y1, c31);
  }
  const int64_t o = a0 * p + b;
  store8<T>(out, o, _mm256_mul_ps(c00, vs));
  store8<T>(out, o + p, _mm256_mul_ps(c10, vs));
  store8<T>(out, o + 2 * p, _mm256_mul_ps(c20, vs));
  store8<T>(out, o + 3 * p, _mm256_mul_ps(c30, vs));
  if (TWO) {
    store8<T>(out, o + 8, _mm256_mul_ps(c01, vs));
    store8<T>(out, o + p + 8, _mm256_mul_ps(c11, vs));
    store8<T>(out, o + 2 * p + 8, _mm256_mul_ps(c21, vs));
    store8<T>(out, o + 3 * p + 8, _mm256_mul_ps(c31, vs));
  }
}

// One output block a, columns b .. b+8.
template <FloatType T>
inline void cross_tile1(const float* y, int64_t ps, const float* had, int64_t m, int64_t p, int64_t a, int64_t b,
                        __m256 vs, void* out) {
  const float* h = had + a * m;
  __m256 acc = _mm256_mul_ps(_mm256_broadcast_ss(h), _mm256_loadu_ps(y + b));
  for (int64_t c = 1; c < m; ++c)
    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(h + c), _mm256_loadu_ps(y + c * ps + b), acc);
  store8<T>(out, a * p + b, _mm256_mul_ps(acc, vs));
}

template <FloatType T>
inline void cross_blocks(const float* y, int64_t ps, const float* had, int64_t m, int64_t p, __m256 vs, void* out) {
  const bool two = p % 16 == 0;
  for (int64_t b = 0; b < p; b += two ? 16 : 8) {
    int64_t a = 0;
    for (; a + 4 <= m; a += 4) {
      if (two)
        cross_tile4<T, true>(y, ps, had, m, p, a, b, vs, out);
      else
        cross_tile4<T, false>(y, ps, had, m, p, a, b, vs, out);
    }
    for (; a < m; ++a) {
      cross_tile1<T>(y, ps, had, m, p, a, b, vs, out);
      if (two) cross_tile1<T>(y, ps, had, m, p, a, b + 8, vs, out);
    }
  }
}

template <FloatType T>
void rows_avx2(const void* x, int64_t r0, int64_t r1, int64_t n, int64_t ldx, const float* had, int64_t m,
               float scale, void* out) {
  const int64_t es = T == FloatType::F32 ? 4 : 2;
  const int64_t p = n / m;
  // The cross-block product reads one vector from each of the m blocks: at
  // p >= 256 floats (1 KiB) apart they fall into a few L1 sets and evict
  // each other; a 64-byte gap between the blocks in y spreads them out.
  const int64_t ps = had != nullptr && p >= 256 ? p + 16 : p;
  const __m256 vs = _mm256_set1_ps(scale);
  float* y = t_buf.get<float>(m * ps);
  for (int64_t r = r0; r < r1; ++r) {
    const void* xr = static_cast<const char*>(x) + r * ldx * es;
    void* orow = static_cast<char*>(out) + r * n * es;
    for (int64_t a = 0; a < m; ++a) {
      float* ya = y + a * ps;
      for (int64_t i = 0; i < p; i += 8) _mm256_storeu_ps(ya + i, stages_1_2_4(load8<T>(xr, a * p + i)));
      int64_t h = 8;
      for (; 4 * h <= p; h *= 4) radix4_pass(ya, p, h);
      if (h < p) radix2_pass(ya, p, h);
    }
    if (had == nullptr) {
      for (int64_t i = 0; i < n; i += 8) store8<T>(orow, i, _mm256_mul_ps(_mm256_loadu_ps(y + i), vs));
    } else {
      cross_blocks<T>(y, ps, had, m, p, vs, orow);
    }
  }
}

}  // namespace

namespace detail {

bool hadamard_rows_avx2(const void* x, FloatType t, int64_t r0, int64_t r1, int64_t n, int64_t ldx,
                        const float* had, int64_t m, float scale, void* out) {
  if (n / m < 8) return false;
  switch (t) {
    case FloatType::F32: rows_avx2<FloatType::F32>(x, r0, r1, n, ldx, had, m, scale, out); break;
    case FloatType::BF16: rows_avx2<FloatType::BF16>(x, r0, r1, n, ldx, had, m, scale, out); break;
    case FloatType::F16: rows_avx2<FloatType::F16>(x, r0, r1, n, ldx, had, m, scale, out); break;
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
