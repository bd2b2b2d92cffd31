// Loads/stores of fp32 / bf16 / fp16 elements for the torch-free CPU kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"

namespace llmeq {
namespace cpu {

// IEEE binary16 storage type: _Float16 (x86-64; GCC 12 has it in C++ there),
// __fp16 on aarch64 (GCC 12 has no C++ _Float16 on Arm; AArch64's __fp16 is
// the IEEE format and converts with one fcvt, round to nearest even).
#if defined(__aarch64__)
using half_t = __fp16;
#else
using half_t = _Float16;
#endif

inline float f16_to_f32(uint16_t h) {
  half_t v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline uint16_t f32_to_f16(float f) {
  half_t v = static_cast<half_t>(f);  // round to nearest even
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

template <FloatType T> struct FloatIO;
template <> struct FloatIO<FloatType::F32> {
  using storage = float;
  static inline float load(const storage* p, int64_t i) { return p[i]; }
  static inline void store(storage* p, int64_t i, float v) { p[i] = v; }
};
template <> struct FloatIO<FloatType::BF16> {
  using storage = uint16_t;
  static inline float load(const storage* p, int64_t i) { return bf16_to_f32(p[i]); }
  static inline void store(storage* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};
template <> struct FloatIO<FloatType::F16> {
  using storage = uint16_t;
  static inline float load(const storage* p, int64_t i) { return f16_to_f32(p[i]); }
  static inline void store(storage* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
};

}  // namespace cpu
}  // namespace llmeq
