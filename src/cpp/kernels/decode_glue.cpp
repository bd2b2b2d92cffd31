// The element-wise glue of a LLaMA-form decoder step (torch-free): RMSNorm
// with the residual add before it, SiLU(gate) * up, and decode attention
// (RoPE on q and k, the K/V cache write, softmax(q K^T) V over the cache).
//
// Why these exist: at decode a 135M model's matrix products take ~11 ms per
// token on a 2-core AVX2 machine, and the ~30 small ATen ops per block around
// them (RMSNorm alone is 7) took as long again, in dispatch and allocation,
// not arithmetic (docs/benchmarks.md "fused decode glue"). One call per piece
// here does the same arithmetic on rows of a few hundred values.
//
// Semantics: _reference.py add_rms_norm / silu_mul / decode_attention_ (HF's
// LLaMA arithmetic: float32 inside, rounding to the storage type where HF's
// ops round). Not bit-equal to HF's ops: sums run in a different order and
// exp / the RoPE products may contract differently; tests bound the gap.
// Baseline flags on purpose (one tier for every CPU): the rows are short and
// the loops are written with 8 independent accumulators so that the compiler
// vectorises them for the baseline ISA without reassociating anything.
#include <cmath>
#include <cstdint>

#include "float_io.h"
#include "llmeq/cpu_kernels.h"
#include "parallel.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

thread_local ThreadBuffer t_buf;

// Waking the thread pool costs more than a decode row takes; thread only
// work of at least this many multiply-adds (prefill rows, long contexts).
constexpr int64_t kParallelWork = int64_t(1) << 16;

inline int threads_for(int64_t work, int num_threads) { return work >= kParallelWork ? num_threads : 1; }

template <FloatType T>
void add_rms_norm_rows(const void* xv, const void* rv, int64_t r0, int64_t r1, int64_t n, int64_t ldx, int64_t ldr,
                       const void* wv, float eps, void* sv, void* ov) {
  using S = typename FloatIO<T>::storage;
  const S* w = static_cast<const S*>(wv);
  float* s = t_buf.get<float>(n);
  for (int64_t r = r0; r < r1; ++r) {
    const S* x = static_cast<const S*>(xv) + r * ldx;
    const S* res = rv != nullptr ? static_cast<const S*>(rv) + r * ldr : nullptr;
    S* so = static_cast<S*>(sv) + r * n;
    // the sum as stored (rounded to T), as HF's `x = x + residual` holds it
    for (int64_t i = 0; i < n; ++i) {
      const float v = res != nullptr ? FloatIO<T>::load(x, i) + FloatIO<T>::load(res, i) : FloatIO<T>::load(x, i);
      FloatIO<T>::store(so, i, v);
      s[i] = FloatIO<T>::load(so, i);
    }
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int l = 0; l < 8; ++l) acc[l] += s[i + l] * s[i + l];
    for (; i < n; ++i) acc[0] += s[i] * s[i];
    const float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    S* o = static_cast<S*>(ov) + r * n;
    for (int64_t j = 0; j < n; ++j) {
      // HF: weight * (x * rsqrt).to(dtype): the normalised value is rounded to T first
      S hj;
      FloatIO<T>::store(&hj, 0, s[j] * inv);
      FloatIO<T>::store(o, j, FloatIO<T>::load(w, j) * FloatIO<T>::load(&hj, 0));
    }
  }
}

template <FloatType T>
void silu_mul_rows(const void* gv, const void* uv, int64_t r0, int64_t r1, int64_t n, int64_t ldg, int64_t ldu,
                   void* ov) {
  using S = typename FloatIO<T>::storage;
  for (int64_t r = r0; r < r1; ++r) {
    const S* g = static_cast<const S*>(gv) + r * ldg;
    const S* u = static_cast<const S*>(uv) + r * ldu;
    S* o = static_cast<S*>(ov) + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float a = FloatIO<T>::load(g, i);
      S act;  // F.silu's result, stored in T before the product (HF: act_fn(gate) * up)
      FloatIO<T>::store(&act, 0, a / (1.0f + std::exp(-a)));
      FloatIO<T>::store(o, i, FloatIO<T>::load(&act, 0) * FloatIO<T>::load(u, i));
    }
  }
}

// HF's rotate-half RoPE of one head: out[i] = x[i] cos[i] - x[i + h] sin[i]
// (i < h), x[i] cos[i] + x[i - h] sin[i] (i >= h), h = D / 2.
template <FloatType T>
inline void rope_head(const typename FloatIO<T>::storage* x, int64_t D, const float* cos, const float* sin,
                      float* out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i)
    out[i] = FloatIO<T>::load(x, i) * cos[i] - FloatIO<T>::load(x, i + h) * sin[i];
  for (int64_t i = h; i < D; ++i)
    out[i] = FloatIO<T>::load(x, i) * cos[i] + FloatIO<T>::load(x, i - h) * sin[i];
}

template <FloatType T>
inline float dot(const float* q, const typename FloatIO<T>::storage* k, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += q[i + l] * FloatIO<T>::load(k, i + l);
  for (; i < D; ++i) acc[0] += q[i] * FloatIO<T>::load(k, i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <FloatType T>
void decode_attention_t(const void* qv, const void* kv, const void* vv, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                        int64_t ldq, int64_t ldk, int64_t ldv, void* kcv, void* vcv, int64_t S, int64_t pos,
                        const float* cos, const float* sin, float scale, void* ov, int num_threads) {
  using St = typename FloatIO<T>::storage;
  St* kc = static_cast<St*>(kcv);
  St* vc = static_cast<St*>(vcv);
  // 1. this position's K (rotated) and V into the caches, stored in T as
  //    HF's cache holds them
  float* kr = t_buf.get<float>(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      rope_head<T>(static_cast<const St*>(kv) + b * ldk + g * D, D, cos, sin, kr);
      St* kdst = kc + ((b * Hkv + g) * S + pos) * D;
      St* vdst = vc + ((b * Hkv + g) * S + pos) * D;
      const St* vsrc = static_cast<const St*>(vv) + b * ldv + g * D;
      for (int64_t i = 0; i < D; ++i) {
        FloatIO<T>::store(kdst, i, kr[i]);
        vdst[i] = vsrc[i];
      }
    }
  // 2. each (row, query head) attends over positions 0..pos of its KV head
  const int64_t L = pos + 1, group = H / Hkv;
  parallel_rows(B * H, threads_for(B * H * L * D, num_threads), [&](int64_t i0, int64_t i1) {
    float* buf = t_buf.get<float>(2 * D + L);
    float *qr = buf, *acc = buf + D, *p = buf + 2 * D;
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / group;
      rope_head<T>(static_cast<const St*>(qv) + b * ldq + h * D, D, cos, sin, qr);
      const St* K = kc + (b * Hkv + g) * S * D;
      const St* V = vc + (b * Hkv + g) * S * D;
      float mx = -INFINITY;
      for (int64_t j = 0; j < L; ++j) {
        p[j] = dot<T>(qr, K + j * D, D) * scale;
        mx = p[j] > mx ? p[j] : mx;
      }
      float denom = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        p[j] = std::exp(p[j] - mx);
        denom += p[j];
      }
      for (int64_t i = 0; i < D; ++i) acc[i] = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        const float pj = p[j];
        const St* vj = V + j * D;
        for (int64_t i = 0; i < D; ++i) acc[i] += pj * FloatIO<T>::load(vj, i);
      }
      const float inv = 1.0f / denom;
      St* o = static_cast<St*>(ov) + b * H * D + h * D;
      for (int64_t i = 0; i < D; ++i) FloatIO<T>::store(o, i, acc[i] * inv);
    }
  });
}

}  // namespace

void add_rms_norm(const void* x, const void* residual, FloatType t, int64_t rows, int64_t n, int64_t ldx,
                  int64_t ldr, const void* weight, float eps, void* sum_out, void* norm_out, int num_threads) {
  if (rows <= 0 || n <= 0) return;
  parallel_rows(rows, threads_for(rows * n, num_threads), [&](int64_t r0, int64_t r1) {
    switch (t) {
      case FloatType::F32: add_rms_norm_rows<FloatType::F32>(x, residual, r0, r1, n, ldx, ldr, weight, eps, sum_out, norm_out); break;
      case FloatType::BF16: add_rms_norm_rows<FloatType::BF16>(x, residual, r0, r1, n, ldx, ldr, weight, eps, sum_out, norm_out); break;
      case FloatType::F16: add_rms_norm_rows<FloatType::F16>(x, residual, r0, r1, n, ldx, ldr, weight, eps, sum_out, norm_out); break;
    }
  });
}

void silu_mul(const void* gate, const void* up, FloatType t, int64_t rows, int64_t n, int64_t ldg, int64_t ldu,
              void* out, int num_threads) {
  if (rows <= 0 || n <= 0) return;
  parallel_rows(rows, threads_for(rows * n, num_threads), [&](int64_t r0, int64_t r1) {
    switch (t) {
      case FloatType::F32: silu_mul_rows<FloatType::F32>(gate, up, r0, r1, n, ldg, ldu, out); break;
      case FloatType::BF16: silu_mul_rows<FloatType::BF16>(gate, up, r0, r1, n, ldg, ldu, out); break;
      case FloatType::F16: silu_mul_rows<FloatType::F16>(gate, up, r0, r1, n, ldg, ldu, out); break;
    }
  });
}

void decode_attention(const void* q, const void* k, const void* v, FloatType t, int64_t batch, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, int64_t ldq, int64_t ldk, int64_t ldv, void* k_cache,
                      void* v_cache, int64_t max_pos, int64_t pos, const float* cos, const float* sin, float scale,
                      void* out, int num_threads) {
  if (batch <= 0 || heads <= 0) return;
  switch (t) {
    case FloatType::F32:
      decode_attention_t<FloatType::F32>(q, k, v, batch, heads, kv_heads, head_dim, ldq, ldk, ldv, k_cache, v_cache,
                                         max_pos, pos, cos, sin, scale, out, num_threads);
      break;
    case FloatType::BF16:
      decode_attention_t<FloatType::BF16>(q, k, v, batch, heads, kv_heads, head_dim, ldq, ldk, ldv, k_cache, v_cache,
                                          max_pos, pos, cos, sin, scale, out, num_threads);
      break;
    case FloatType::F16:
      decode_attention_t<FloatType::F16>(q, k, v, batch, heads, kv_heads, head_dim, ldq, ldk, ldv, k_cache, v_cache,
                                         max_pos, pos, cos, sin, scale, out, num_threads);
      break;
  }
}

}  // namespace cpu
}  // namespace llmeq
