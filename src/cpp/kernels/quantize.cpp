// Quantize / dequantize kernels (torch-free). Semantics: _reference.py.
//
// Each row is read twice (range pass, then quantize pass); a row of an LLM
// activation or weight (K <= ~16k) stays in L1/L2 between the passes, so the
// second read is cheap and the code stays simple and exact.
#include <algorithm>
#include <vector>

#include "float_io.h"
#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"
#include "parallel.h"

// The per-row loops are compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (GCC function multi-versioning): the same IEEE ops in
// every version, so results do not depend on the CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMEQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLMEQ_CLONES
#endif
#define LLMEQ_INLINE inline __attribute__((always_inline))

namespace llmeq {
namespace cpu {
namespace {

struct Range {
  float absmax, mn, mx;
};

// min / max / absmax of n elements; NaN anywhere makes all three NaN. The NaN
// flag is kept apart so the min/max loops stay vectorisable.
template <FloatType T>
LLMEQ_INLINE Range range_of(const typename FloatIO<T>::storage* x, int64_t n) {
  float mn = INFINITY, mx = -INFINITY;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = FloatIO<T>::load(x, i);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    nan |= (v != v);
  }
  if (nan) return {NAN, NAN, NAN};
  const float am = std::max(-mn, mx);
  return {n ? am : 0.0f, mn, mx};
}

template <FloatType T>
LLMEQ_INLINE void quantize_span(const typename FloatIO<T>::storage* x, int64_t n, float s, int zp,
                                int bits, int8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(quantize_value(FloatIO<T>::load(x, i), s, zp, bits));
}

LLMEQ_INLINE void scale_for(const Range& r, int bits, bool symmetric, float* s, int8_t* zp) {
  if (symmetric) {
    *s = scale_from_absmax(r.absmax, bits);
    *zp = 0;
  } else {
    scale_zp_from_minmax(r.mn, r.mx, bits, s, zp);
  }
}

// Dynamic quantization of rows [r0, r1). (The dynamic and static loops are
// written out separately on purpose: sharing them through a scale callback
// kept GCC from inlining the range pass into the multi-versioned clones and
// cost 2.5x in throughput, measured.)
template <FloatType T>
LLMEQ_INLINE void quantize_dynamic_rows(const void* xv, int64_t r0, int64_t r1, int64_t K, int64_t ldx,
                                        int bits, bool symmetric, int64_t g, void* qv, float* scale,
                                        int8_t* zero_point) {
  using S = typename FloatIO<T>::storage;
  const int64_t G = K / g;
  std::vector<int8_t> tmp(bits != 8 ? K : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const S* x = static_cast<const S*>(xv) + r * ldx;
    int8_t* q = bits == 8 ? static_cast<int8_t*>(qv) + r * K : tmp.data();
    for (int64_t j = 0; j < G; ++j) {
      float s;
      int8_t zp;
      scale_for(range_of<T>(x + j * g, g), bits, symmetric, &s, &zp);
      scale[r * G + j] = s;
      zero_point[r * G + j] = zp;
      quantize_span<T>(x + j * g, g, s, zp, bits, q + j * g);
    }
    if (bits != 8) pack_row(q, K, bits, static_cast<uint8_t*>(qv) + r * packed_row_bytes(K, bits));
  }
}

template <FloatType T>
LLMEQ_INLINE void quantize_static_rows(const void* xv, int64_t r0, int64_t r1, int64_t K, int64_t ldx,
                                       int bits, int64_t g, const float* scale, const int8_t* zero_point,
                                       int64_t sstride, void* qv) {
  using S = typename FloatIO<T>::storage;
  const int64_t G = K / g;
  std::vector<int8_t> tmp(bits != 8 ? K : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const S* x = static_cast<const S*>(xv) + r * ldx;
    int8_t* q = bits == 8 ? static_cast<int8_t*>(qv) + r * K : tmp.data();
    for (int64_t j = 0; j < G; ++j)
      quantize_span<T>(x + j * g, g, scale[r * sstride + j], zero_point[r * sstride + j], bits, q + j * g);
    if (bits != 8) pack_row(q, K, bits, static_cast<uint8_t*>(qv) + r * packed_row_bytes(K, bits));
  }
}

template <FloatType T>
LLMEQ_INLINE void quantize_u8_rows(const void* xv, int64_t r0, int64_t r1, int64_t K, int64_t ldx,
                                   bool symmetric, uint8_t* qu, int64_t ldq, float* scale, int32_t* corr) {
  using S = typename FloatIO<T>::storage;
  for (int64_t r = r0; r < r1; ++r) {
    const S* x = static_cast<const S*>(xv) + r * ldx;
    float s;
    int8_t zp;
    scale_for(range_of<T>(x, K), 8, symmetric, &s, &zp);
    scale[r] = s;
    corr[r] = 128 + zp;
    uint8_t* q = qu + r * ldq;
    for (int64_t i = 0; i < K; ++i)
      q[i] = static_cast<uint8_t>(quantize_value(FloatIO<T>::load(x, i), s, zp, 8) + 128);
  }
}

template <FloatType O>
LLMEQ_INLINE void dequantize_rows(const void* qv, int64_t r0, int64_t r1, int64_t K, int bits, int64_t g,
                                  const float* scale, const int8_t* zero_point, int64_t sstride, void* ov) {
  using S = typename FloatIO<O>::storage;
  const int64_t G = K / g;
  for (int64_t r = r0; r < r1; ++r) {
    S* out = static_cast<S*>(ov) + r * K;
    for (int64_t j = 0; j < G; ++j) {
      const float s = scale[r * sstride + j];
      const float z = static_cast<float>(zero_point[r * sstride + j]);
      const int64_t k0 = j * g;
      if (bits == 8) {
        const int8_t* q = static_cast<const int8_t*>(qv) + r * K;
        for (int64_t k = k0; k < k0 + g; ++k) FloatIO<O>::store(out, k, s * (static_cast<float>(q[k]) - z));
      } else {
        const uint8_t* q = static_cast<const uint8_t*>(qv) + r * packed_row_bytes(K, bits);
        for (int64_t k = k0; k < k0 + g; ++k)
          FloatIO<O>::store(out, k, s * (static_cast<float>(packed_value(q, k, bits)) - z));
      }
    }
  }
}

// Non-template, multi-versioned entry points (one per float type).
#define LLMEQ_DEFINE_FOR_TYPE(TY)                                                                     \
  LLMEQ_CLONES void qdyn_##TY(const void* x, int64_t r0, int64_t r1, int64_t K, int64_t ldx, int bits, \
                              bool sym, int64_t g, void* q, float* s, int8_t* z) {                    \
    quantize_dynamic_rows<FloatType::TY>(x, r0, r1, K, ldx, bits, sym, g, q, s, z);                   \
  }                                                                                                   \
  LLMEQ_CLONES void qsta_##TY(const void* x, int64_t r0, int64_t r1, int64_t K, int64_t ldx, int bits, \
                              int64_t g, const float* s, const int8_t* z, int64_t ss, void* q) {      \
    quantize_static_rows<FloatType::TY>(x, r0, r1, K, ldx, bits, g, s, z, ss, q);                     \
  }                                                                                                   \
  LLMEQ_CLONES void qu8_##TY(const void* x, int64_t r0, int64_t r1, int64_t K, int64_t ldx, bool sym,  \
                             uint8_t* q, int64_t ldq, float* s, int32_t* c) {                         \
    quantize_u8_rows<FloatType::TY>(x, r0, r1, K, ldx, sym, q, ldq, s, c);                            \
  }                                                                                                   \
  LLMEQ_CLONES void deq_##TY(const void* q, int64_t r0, int64_t r1, int64_t K, int bits, int64_t g,    \
                             const float* s, const int8_t* z, int64_t ss, void* o) {                  \
    dequantize_rows<FloatType::TY>(q, r0, r1, K, bits, g, s, z, ss, o);                               \
  }
LLMEQ_DEFINE_FOR_TYPE(F32)
LLMEQ_DEFINE_FOR_TYPE(BF16)
LLMEQ_DEFINE_FOR_TYPE(F16)
#undef LLMEQ_DEFINE_FOR_TYPE

#define LLMEQ_PICK(prefix, t) \
  ((t) == FloatType::F32 ? prefix##_F32 : (t) == FloatType::BF16 ? prefix##_BF16 : prefix##_F16)

}  // namespace

void quantize_dynamic(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx, int bits,
                      bool symmetric, int64_t group_size, void* q, float* scale, int8_t* zero_point,
                      int num_threads) {
  auto fn = LLMEQ_PICK(qdyn, xtype);
  parallel_rows(rows, num_threads, [&](int64_t b, int64_t e) {
    fn(x, b, e, K, ldx, bits, symmetric, group_size, q, scale, zero_point);
  });
}

void quantize_with_scale(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx, int bits,
                         int64_t group_size, const float* scale, const int8_t* zero_point,
                         int64_t scale_stride_row, void* q, int num_threads) {
  auto fn = LLMEQ_PICK(qsta, xtype);
  parallel_rows(rows, num_threads, [&](int64_t b, int64_t e) {
    fn(x, b, e, K, ldx, bits, group_size, scale, zero_point, scale_stride_row, q);
  });
}

void quantize_rows_u8(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx, bool symmetric,
                      uint8_t* q_u8, int64_t ldq, float* scale, int32_t* corr, int num_threads) {
  auto fn = LLMEQ_PICK(qu8, xtype);
  parallel_rows(rows, num_threads, [&](int64_t b, int64_t e) {
    fn(x, b, e, K, ldx, symmetric, q_u8, ldq, scale, corr);
  });
}

void dequantize(const void* q, int64_t rows, int64_t K, int bits, int64_t group_size, const float* scale,
                const int8_t* zero_point, int64_t scale_stride_row, void* out, FloatType otype,
                int num_threads) {
  auto fn = LLMEQ_PICK(deq, otype);
  parallel_rows(rows, num_threads, [&](int64_t b, int64_t e) {
    fn(q, b, e, K, bits, group_size, scale, zero_point, scale_stride_row, out);
  });
}

}  // namespace cpu
}  // namespace llmeq
