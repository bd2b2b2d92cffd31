// Walsh-Hadamard transform (torch-free): dispatch + the scalar path.
// Semantics: _reference.py hadamard_transform; the butterflies are those of
// hadamard.transform (pairs (i, i + h) inside blocks of 2h, h = 1, 2, 4, ...;
// (u + v, u - v)), so for m = 1 the result matches it bit for bit.
// Baseline flags (x86-64 / ARMv8-A); the scalar loops are what aarch64 runs.
#include <cstdint>

#include "float_io.h"
#include "llmeq/cpu_kernels.h"
#include "parallel.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace detail {
#if defined(__x86_64__)
// Rows [r0, r1) with AVX2 + FMA (hadamard_avx2.cpp); false when p < 8 (no
// full vector per block: the scalar path is as fast there).
bool hadamard_rows_avx2(const void* x, FloatType t, int64_t r0, int64_t r1, int64_t n, int64_t ldx,
                        const float* had, int64_t m, float scale, void* out);
#endif
}  // namespace detail

namespace {

thread_local ThreadBuffer t_buf;

void fwht_block(float* y, int64_t p) {
  for (int64_t h = 1; h < p; h *= 2)
    for (int64_t j = 0; j < p; j += 2 * h)
      for (int64_t i = j; i < j + h; ++i) {
        const float u = y[i], v = y[i + h];
        y[i] = u + v;
        y[i + h] = u - v;
      }
}

// One row: y (n floats of scratch) <- butterflies of x, then out <- scale *
// had x-blocks of y. The cross-block sum starts from the first product (not
// from 0 + product, which would turn -0 into +0) and adds in a' order: the
// AVX2 path's order.
template <FloatType T>
void row_scalar(const typename FloatIO<T>::storage* x, int64_t n, const float* had, int64_t m, float scale,
                float* y, float* z, typename FloatIO<T>::storage* out) {
  const int64_t p = n / m;
  for (int64_t i = 0; i < n; ++i) y[i] = FloatIO<T>::load(x, i);
  for (int64_t a = 0; a < m; ++a) fwht_block(y + a * p, p);
  if (had == nullptr) {
    for (int64_t i = 0; i < n; ++i) FloatIO<T>::store(out, i, y[i] * scale);
    return;
  }
  for (int64_t a = 0; a < m; ++a) {
    const float* hr = had + a * m;
    for (int64_t b = 0; b < p; ++b) z[b] = hr[0] * y[b];
    for (int64_t c = 1; c < m; ++c) {
      const float hc = hr[c];
      const float* yc = y + c * p;
      for (int64_t b = 0; b < p; ++b) z[b] = z[b] + hc * yc[b];
    }
    for (int64_t b = 0; b < p; ++b) FloatIO<T>::store(out, a * p + b, z[b] * scale);
  }
}

template <FloatType T>
void rows_scalar(const void* xv, int64_t r0, int64_t r1, int64_t n, int64_t ldx, const float* had, int64_t m,
                 float scale, void* ov) {
  using S = typename FloatIO<T>::storage;
  float* y = t_buf.get<float>(n + n / m);
  for (int64_t r = r0; r < r1; ++r)
    row_scalar<T>(static_cast<const S*>(xv) + r * ldx, n, had, m, scale, y, y + n, static_cast<S*>(ov) + r * n);
}

}  // namespace

void hadamard_transform(const void* x, FloatType t, int64_t rows, int64_t n, int64_t ldx, const float* had,
                        int64_t m, float scale, void* out, int num_threads) {
  if (rows <= 0 || n <= 0) return;
  if (had == nullptr) m = 1;
  // A decode row (n <= 16k) takes a few microseconds: waking a thread pool
  // for it costs more than it saves.
  const int nt = rows * n >= (int64_t{1} << 15) ? num_threads : 1;
  const Isa isa = active_isa();
  parallel_rows(rows, nt, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__)
    if ((isa == Isa::Avx2 || has_avx512(isa)) &&
        detail::hadamard_rows_avx2(x, t, r0, r1, n, ldx, had, m, scale, out))
      return;
#endif
    (void)isa;
    switch (t) {
      case FloatType::F32: rows_scalar<FloatType::F32>(x, r0, r1, n, ldx, had, m, scale, out); break;
      case FloatType::BF16: rows_scalar<FloatType::BF16>(x, r0, r1, n, ldx, had, m, scale, out); break;
      case FloatType::F16: rows_scalar<FloatType::F16>(x, r0, r1, n, ldx, had, m, scale, out); break;
    }
  });
}

}  // namespace cpu
}  // namespace llmeq
