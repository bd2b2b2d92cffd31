// The int8 GEMMs' int32 -> output step on AVX-512 (raw C, or the fused
// epilogue of cpu_kernels.h), shared by the VNNI and AMX translation units.
// Include only from files compiled with the AVX-512 flags of CMakeLists.txt.
//
// Internal linkage on purpose (see thread_buffer.h): these inline functions
// hold AVX-512 code and must never be merged into a baseline translation unit.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "llmeq/cpu_kernels.h"

namespace llmeq {
namespace cpu {
namespace {

inline __mmask16 tail_mask16(int64_t n) {  // n in [0, 16]: lanes [0, n)
  return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// Where finished int32 accumulators go: raw C, or the epilogue.
struct Sink {
  int32_t* C;
  int64_t ldc;
  const GemmEpilogue* ep;
};

// fp32 -> bf16 round-to-nearest-even with integer ops (vcvtneps2bf16 is not
// used: it flushes denormals, which the scalar reference does not).
inline __m256i cvt_bf16(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// Finish up to 16 consecutive outputs (row m, columns n..n+popcount(mask)-1).
inline void sink_row(const Sink& s, int64_t m, int64_t n, __m512i acc, __mmask16 mask) {
  if (s.ep == nullptr) {
    _mm512_mask_storeu_epi32(s.C + m * s.ldc + n, mask, acc);
    return;
  }
  const GemmEpilogue& e = *s.ep;
  if (e.a_corr != nullptr) {
    const __m512i corr = _mm512_set1_epi32(e.a_corr[m * e.a_corr_stride]);
    acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(corr, _mm512_maskz_loadu_epi32(mask, e.b_sum + n)));
  }
  const __m512 as = _mm512_set1_ps(e.a_scale != nullptr ? e.a_scale[m * e.a_scale_stride] : 1.0f);
  const __m512 bs = e.b_scale != nullptr ? _mm512_maskz_loadu_ps(mask, e.b_scale + n)
                                         : _mm512_set1_ps(1.0f);
  // (as * bs) * float(t) [+ bias]: same op order as the scalar reference.
  __m512 v = _mm512_mul_ps(_mm512_mul_ps(as, bs), _mm512_cvtepi32_ps(acc));
  if (e.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e.bias + n));
  switch (e.out_type) {
    case FloatType::F32:
      _mm512_mask_storeu_ps(static_cast<float*>(e.out) + m * e.ldo + n, mask, v);
      break;
    case FloatType::BF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.out) + m * e.ldo + n, mask, cvt_bf16(v));
      break;
    case FloatType::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.out) + m * e.ldo + n, mask,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace llmeq
