// Per-channel and whole-tensor reductions (torch-free). Semantics: _reference.py.
#include <algorithm>
#include <vector>

#include "float_io.h"
#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMEQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLMEQ_CLONES
#endif

namespace llmeq {
namespace cpu {
namespace {

// Partial column min/max over rows [r0, r1) into mn/mx [K]; NaNs are counted
// per column in `nan` so the min/max loops vectorise (a NaN-aware compare in
// the hot loop would not).
template <FloatType T>
inline void column_minmax(const void* xv, int64_t r0, int64_t r1, int64_t K, int64_t ldx, float* mn,
                          float* mx, uint8_t* nan) {
  using S = typename FloatIO<T>::storage;
  for (int64_t r = r0; r < r1; ++r) {
    const S* x = static_cast<const S*>(xv) + r * ldx;
    for (int64_t k = 0; k < K; ++k) {
      const float v = FloatIO<T>::load(x, k);
      mn[k] = v < mn[k] ? v : mn[k];
      mx[k] = v > mx[k] ? v : mx[k];
      nan[k] |= (v != v);
    }
  }
}

LLMEQ_CLONES void colmm_F32(const void* x, int64_t a, int64_t b, int64_t K, int64_t ld, float* mn, float* mx,
                            uint8_t* n) {
  column_minmax<FloatType::F32>(x, a, b, K, ld, mn, mx, n);
}
LLMEQ_CLONES void colmm_BF16(const void* x, int64_t a, int64_t b, int64_t K, int64_t ld, float* mn, float* mx,
                             uint8_t* n) {
  column_minmax<FloatType::BF16>(x, a, b, K, ld, mn, mx, n);
}
LLMEQ_CLONES void colmm_F16(const void* x, int64_t a, int64_t b, int64_t K, int64_t ld, float* mn, float* mx,
                            uint8_t* n) {
  column_minmax<FloatType::F16>(x, a, b, K, ld, mn, mx, n);
}

struct Partial {
  std::vector<float> mn, mx;
  std::vector<uint8_t> nan;
  explicit Partial(int64_t K) : mn(K, INFINITY), mx(K, -INFINITY), nan(K, 0) {}
};

// Column min/max over all rows, split over threads by rows and merged.
Partial column_minmax_all(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, int num_threads) {
  auto fn = t == FloatType::F32 ? colmm_F32 : t == FloatType::BF16 ? colmm_BF16 : colmm_F16;
  const int nt = std::max<int64_t>(1, std::min<int64_t>(resolve_threads(num_threads), rows));
  std::vector<Partial> parts(nt, Partial(K));
  parallel_rows(nt, nt, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t chunk = (rows + nt - 1) / nt;
      const int64_t r0 = p * chunk, r1 = std::min(rows, r0 + chunk);
      if (r0 < r1) fn(x, r0, r1, K, ldx, parts[p].mn.data(), parts[p].mx.data(), parts[p].nan.data());
    }
  });
  Partial& out = parts[0];
  for (int p = 1; p < nt; ++p)
    for (int64_t k = 0; k < K; ++k) {
      out.mn[k] = std::min(out.mn[k], parts[p].mn[k]);
      out.mx[k] = std::max(out.mx[k], parts[p].mx[k]);
      out.nan[k] |= parts[p].nan[k];
    }
  return std::move(out);
}

}  // namespace

void channel_stats_update(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx, float* absmax,
                          float* mn, float* mx, int num_threads) {
  if (rows == 0) return;
  Partial p = column_minmax_all(x, xtype, rows, K, ldx, num_threads);
  for (int64_t k = 0; k < K; ++k) {
    const float cmn = p.nan[k] ? NAN : p.mn[k];
    const float cmx = p.nan[k] ? NAN : p.mx[k];
    const float cam = p.nan[k] ? NAN : std::max(-p.mn[k], p.mx[k]);
    absmax[k] = nan_max(cam, absmax[k]);
    mx[k] = nan_max(cmx, mx[k]);
    mn[k] = nan_min(cmn, mn[k]);
  }
}

void tensor_minmax(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx, float* out3,
                   int num_threads) {
  float am = 0.0f, lo = INFINITY, hi = -INFINITY;
  if (rows > 0 && K > 0) {
    Partial p = column_minmax_all(x, xtype, rows, K, ldx, num_threads);
    bool nan = false;
    for (int64_t k = 0; k < K; ++k) {
      lo = std::min(lo, p.mn[k]);
      hi = std::max(hi, p.mx[k]);
      nan |= p.nan[k] != 0;
    }
    am = std::max(-lo, hi);
    if (nan) am = lo = hi = NAN;
  }
  out3[0] = am;
  out3[1] = lo;
  out3[2] = hi;
}

}  // namespace cpu
}  // namespace llmeq
