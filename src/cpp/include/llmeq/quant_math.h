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

// scale = absmax / qmax; a zero range gives 1 (all values -> 0).
LLMEQ_HD float scale_from_absmax(float absmax, int bits) {
  float s = absmax / static_cast<float>(qmax_of(bits));
  return s == 0.0f ? 1.0f : s;
}

// Asymmetric scale/zero-point from a min/max widened to contain 0.
LLMEQ_HD void scale_zp_from_minmax(float mn, float mx, int bits, float* scale, int8_t* zp) {
  const float lo = nan_min(mn, 0.0f);
  const float hi = nan_max(mx, 0.0f);
  float s = (hi - lo) / static_cast<float>((1 << bits) - 1);
  if (s == 0.0f) s = 1.0f;
  float z = static_cast<float>(qmin_of(bits)) - std::nearbyint(lo / s);
  if (z != z) z = 0.0f;
  z = z < qmin_of(bits) ? qmin_of(bits) : (z > qmax_of(bits) ? qmax_of(bits) : z);
  *scale = s;
  *zp = static_cast<int8_t>(z);
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
