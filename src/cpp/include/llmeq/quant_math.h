// Scalar quantization math shared by every kernel (CPU now, CUDA later: the
// functions are plain inline code with no library calls that nvcc lacks).
// It mirrors python/llmeasyquant/_reference.py operation for operation so the
// kernels can be bit-exact against it: fp32 division (never a reciprocal
// multiply), round-half-even, NaN kept visible.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LLMEQ_HD __host__ __device__ __forceinline__
#else
// static: every translation unit gets its own copy, so a copy compiled with
// -mavx2/-mavx512 flags can never be the one a baseline file links to.
#define LLMEQ_HD static inline
#endif

namespace llmeq {

LLMEQ_HD int qmin_of(int bits) { return -(1 << (bits - 1)); }
LLMEQ_HD int qmax_of(int bits) { return (1 << (bits - 1)) - 1; }

// max that returns NaN if either side is NaN (torch.maximum semantics);
// fmaxf would silently drop a NaN activation.
LLMEQ_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : (b != b ? b : (a > b ? a : b)); }
LLMEQ_HD float nan_min(float a, float b) { return (a != a || a < b) ? a : (b != b ? b : (a < b ? a : b)); }

// Finite (neither NaN nor +-Inf), without library calls: Inf - Inf and NaN
// are NaN, which compares unequal to 0.
LLMEQ_HD bool is_finite(float v) { return (v - v) == 0.0f; }

// scale = absmax / qmax; a zero range gives 1 (all values -> 0).
LLMEQ_HD float scale_from_absmax(float absmax, int bits) {
  float s = absmax / static_cast<float>(qmax_of(bits));
  return s == 0.0f ? 1.0f : s;
}

// Asymmetric scale/zero-point from a min/max widened to contain 0.
LLMEQ_HD void scale_zp_from_minmax(float mn, float mx, int bits, float* scale, int8_t* zp) {
  const float lo = nan_min(mn, 0.0f);
  const float hi = nan_max(mx, 0.0f);
  const float d = static_cast<float>((1 << bits) - 1);
  const float span = hi - lo;
  // A finite range wider than FLT_MAX (e.g. [-3e38, 3e38]) overflows hi - lo;
  // only then divide first (hi/d - lo/d <= 2/3 FLT_MAX). Every other range
  // keeps the rounding of (hi - lo) / d (the reference does the same).
  const bool overflow = is_finite(hi) && is_finite(lo) && !is_finite(span);
  float s = overflow ? hi / d - lo / d : span / d;
  if (s == 0.0f) s = 1.0f;
  float z = static_cast<float>(qmin_of(bits)) - std::nearbyint(lo / s);
  if (z != z) z = 0.0f;
  z = z < qmin_of(bits) ? qmin_of(bits) : (z > qmax_of(bits) ? qmax_of(bits) : z);
  *scale = s;
  *zp = static_cast<int8_t>(z);
}

// Scale / zero-point of an empty range (K = 0): what the reductions start
// from (absmax 0, min +inf, max -inf) gives scale 1, zero-point 0 / qmin.
LLMEQ_HD void empty_range_scale(int bits, bool symmetric, float* scale, int8_t* zp) {
  if (symmetric) {
    *scale = scale_from_absmax(0.0f, bits);
    *zp = 0;
  } else {
    scale_zp_from_minmax(INFINITY, -INFINITY, bits, scale, zp);
  }
}

// One EMA step of paper Algorithm 1 on state [absmax, min, max, steps] with
// the batch's raw (absmax, min, max) r; a, b = alpha, 1 - alpha. A
// non-finite observation (NaN / Inf in the batch), or an update that would
// make the state non-finite, is skipped: the state is left untouched (steps
// not incremented). A non-finite state is re-initialised by the next finite
// observation. Writes the triple the scale is derived from to src: the
// state, or, when skipping with no state yet (steps == 0), the observation
// itself (non-finite, so the output is visibly not finite). fp32 ops are
// spelled out for the CUDA build (no contraction: -fmad=false there,
// -ffp-contract=off here).
LLMEQ_HD void ema_step(float* st, const float r[3], float a, float b, float e, float src[3]) {
  const float obs[3] = {nan_max(r[0], e), nan_min(r[1], 0.0f), nan_max(r[2], 0.0f)};
  const bool first = st[3] == 0.0f || !(is_finite(st[0]) && is_finite(st[1]) && is_finite(st[2]));
  float nw[3];
  bool ok = is_finite(r[1]) && is_finite(r[2]);
  for (int i = 0; i < 3; ++i) {
    nw[i] = first ? obs[i] : a * st[i] + b * obs[i];
    ok = ok && is_finite(nw[i]);
  }
  const bool fallback = !ok && st[3] == 0.0f;
  if (ok) {
    for (int i = 0; i < 3; ++i) st[i] = nw[i];
    st[3] = st[3] + 1.0f;
  }
  for (int i = 0; i < 3; ++i) src[i] = fallback ? obs[i] : st[i];
}

// q = clamp(round_half_even(x / s) + zp, qmin, qmax); NaN quotient -> 0.
LLMEQ_HD int quantize_value(float x, float s, int zp, int bits) {
  float v = std::nearbyint(x / s);
  if (v != v) v = 0.0f;
  const float lo = static_cast<float>(qmin_of(bits));
  const float hi = static_cast<float>(qmax_of(bits));
  v += static_cast<float>(zp);
  v = v < lo ? lo : (v > hi ? hi : v);  // also clamps +-inf
  return static_cast<int>(v);
}

// Packed weight rows (the layouts of _reference.pack_bits):
//  8 bits: int8 as is;
//  4 bits: two's-complement nibbles, element 2i in the low nibble of byte i;
//  2/3 bits: LSB-first bit stream of the offset-binary code q - qmin, value k's
//    bit j at stream bit k*bits + j; rows padded to a multiple of 8 values
//    (ceil(K/8) * bits bytes), the padding zero.
LLMEQ_HD int64_t packed_row_bytes(int64_t K, int bits) {
  return bits == 8 ? K : (bits == 4 ? (K + 1) / 2 : (K + 7) / 8 * bits);
}

// Value k of a packed row of bits in {2, 3, 4}.
LLMEQ_HD int packed_value(const uint8_t* row, int64_t k, int bits) {
  if (bits == 4) {
    const int nib = (row[k >> 1] >> ((k & 1) * 4)) & 0xF;
    return nib >= 8 ? nib - 16 : nib;
  }
  const int64_t p = k * bits;
  const int sh = static_cast<int>(p & 7);
  uint32_t w = row[p >> 3];
  if (sh + bits > 8) w |= static_cast<uint32_t>(row[(p >> 3) + 1]) << 8;  // inside the padded row
  return static_cast<int>((w >> sh) & ((1u << bits) - 1u)) + qmin_of(bits);
}

// Pack K values (in range for bits in {2, 3, 4}) into one row.
LLMEQ_HD void pack_row(const int8_t* q, int64_t K, int bits, uint8_t* out) {
  if (bits == 4) {
    for (int64_t i = 0; i < K / 2; ++i)
      out[i] = static_cast<uint8_t>((q[2 * i] & 0xF) | ((q[2 * i + 1] & 0xF) << 4));
    if (K % 2) out[K / 2] = static_cast<uint8_t>(q[K - 1] & 0xF);
    return;
  }
  const int64_t nb = packed_row_bytes(K, bits);
  for (int64_t i = 0; i < nb; ++i) out[i] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const uint32_t u = static_cast<uint32_t>(q[k] - qmin_of(bits)) << ((k * bits) & 7);
    out[(k * bits) >> 3] |= static_cast<uint8_t>(u & 0xFF);
    if (u >> 8) out[((k * bits) >> 3) + 1] |= static_cast<uint8_t>(u >> 8);
  }
}

// bf16 / fp16 <-> fp32 without torch: bf16 is the top half of an fp32.
LLMEQ_HD float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
LLMEQ_HD uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace llmeq
