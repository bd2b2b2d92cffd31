// Quantize, dequantize, whole-tensor and per-channel reductions, and the EMA
// scale tracker (paper Algorithm 1) on CUDA. Scalar math comes from
// quant_math.h, the same code the CPU kernels use, so results are bit-exact
// against the reference (IEEE division, round-half-even, NaN kept visible).
#include "common.cuh"

namespace llmeq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Max / min over the lps lanes of an aligned sub-group (lps a power of two;
// 32 = the whole warp). Every lane of the warp must call it.
__device__ __forceinline__ float group_max(float v, int lps) {
  for (int o = lps >> 1; o; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float group_min(float v, int lps) {
  for (int o = lps >> 1; o; o >>= 1) v = nan_min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// lps lanes per segment (a whole warp for long segments; g / 8 lanes for
// groups of g <= 128, so that a g = 64 group does not leave 24 of 32 lanes
// idle): reduce (absmax or min/max), derive the scale, then quantize the
// segment, re-reading it (from L1/L2) in 8-value chunks. The reductions are
// max / min, whose result does not depend on the lane count.
__global__ void __launch_bounds__(kThreads) quantize_segments_kernel(const void* __restrict__ x, FloatType t,
                                                                     int64_t rows, int64_t K, int64_t ldx, int bits,
                                                                     bool symmetric, int64_t g, bool write_q,
                                                                     void* __restrict__ q, float* __restrict__ scale,
                                                                     int8_t* __restrict__ zp, int lps) {
  const int lane = threadIdx.x & 31, sub = lane & (lps - 1), per_warp = 32 / lps;
  const int64_t G = K / g;
  const int64_t nseg = rows * G;
  const int64_t Kq = bits == 4 ? (K + 1) / 2 : K;
  // the loop is uniform over the warp (shuffles need every lane); a lane
  // whose segment is past the end only joins the reductions
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * per_warp; first < nseg;
       first += static_cast<int64_t>(gridDim.x) * kWarps * per_warp) {
    const int64_t seg = first + lane / lps;
    const bool valid = seg < nseg;
    const int64_t row = valid ? seg / G : 0, c0 = valid ? (seg % G) * g : 0;
    const int64_t base = row * ldx + c0;
    const bool vec = (g % 8 == 0) &&
                     (reinterpret_cast<uintptr_t>(static_cast<const char*>(x) + base * elem_bytes(t)) % 16 == 0);
    float amax = 0.0f, mn = INFINITY, mx = -INFINITY;
    const int end = valid ? static_cast<int>(g) : 0, step = 8 * lps;
#pragma unroll 4
    for (int j = sub * 8; j < end; j += step) {
      float v[8];
      const bool full = j + 8 <= g;
      if (full) {
        load8(x, base + j, t, vec, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = j + e < g ? load_f(x, base + j + e, t) : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (!full && j + e >= g) continue;
        amax = nan_max(amax, fabsf(v[e]));
        mn = nan_min(mn, v[e]);
        mx = nan_max(mx, v[e]);
      }
    }
    float s;
    int8_t z = 0;
    if (symmetric) {
      s = scale_from_absmax(group_max(amax, lps), bits);
    } else {
      scale_zp_from_minmax(group_min(mn, lps), group_max(mx, lps), bits, &s, &z);
    }
    if (valid && sub == 0) {
      scale[seg] = s;
      zp[seg] = z;
    }
    if (!write_q) continue;
#pragma unroll 4
    for (int j = sub * 8; j < end; j += step) {
      float v[8];
      int qv[8];
      const bool full = j + 8 <= g;
      if (full) {
        load8(x, base + j, t, vec, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = j + e < g ? load_f(x, base + j + e, t) : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) qv[e] = quantize_value(v[e], s, z, bits);
      if (bits == 8) {
        int8_t* qq = static_cast<int8_t*>(q) + row * Kq + c0;
        if (full) {
          write_q8(qq, j, qv, reinterpret_cast<uintptr_t>(qq + j) % 8 == 0);
        } else {
          for (int e = 0; e < 8 && j + e < g; ++e) qq[j + e] = static_cast<int8_t>(qv[e]);
        }
      } else {
        // c0 + j is even here (g even or g == K), so value pairs share a byte.
        uint8_t* qq = static_cast<uint8_t*>(q) + row * Kq + (c0 + j) / 2;
        uint8_t b[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t lo = static_cast<uint32_t>(qv[2 * e]) & 0xfu;
          const uint32_t hi = (j + 2 * e + 1 < g) ? (static_cast<uint32_t>(qv[2 * e + 1]) & 0xfu) : 0u;
          b[e] = static_cast<uint8_t>(lo | (hi << 4));
        }
        if (full && reinterpret_cast<uintptr_t>(qq) % 4 == 0) {
          *reinterpret_cast<uint32_t*>(qq) = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
        } else {
          for (int e = 0; e < 4 && j + 2 * e < g; ++e) qq[e] = b[e];
        }
      }
    }
  }
}

// One thread per output byte: 8-bit one value, 4-bit a (low, high) pair.
__global__ void quantize_with_scale_kernel(const void* __restrict__ x, FloatType t, int64_t rows, int64_t K,
                                           int64_t ldx, int bits, int64_t g, const float* __restrict__ scale,
                                           const int8_t* __restrict__ zp, int64_t sstride, void* __restrict__ q) {
  const int64_t Kq = bits == 4 ? (K + 1) / 2 : K;
  const int64_t n = rows * Kq;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / Kq, cq = i % Kq;
    if (bits == 8) {
      const int64_t si = row * sstride + cq / g;
      static_cast<int8_t*>(q)[i] =
          static_cast<int8_t>(quantize_value(load_f(x, row * ldx + cq, t), scale[si], zp[si], 8));
    } else {
      uint32_t b = 0;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t c = 2 * cq + e;
        if (c >= K) break;
        const int64_t si = row * sstride + c / g;
        b |= (static_cast<uint32_t>(quantize_value(load_f(x, row * ldx + c, t), scale[si], zp[si], 4)) & 0xfu)
             << (4 * e);
      }
      static_cast<uint8_t*>(q)[i] = static_cast<uint8_t>(b);
    }
  }
}

__global__ void __launch_bounds__(kThreads) tensor_minmax_kernel(const void* __restrict__ x, FloatType t, int64_t rows,
                                                                 int64_t K, int64_t ldx, float* __restrict__ partial) {
  float a = 0.0f, mn = INFINITY, mx = -INFINITY;
  const int64_t n = rows * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = load_f(x, (i / K) * ldx + i % K, t);
    a = nan_max(a, fabsf(v));
    mn = nan_min(mn, v);
    mx = nan_max(mx, v);
  }
  block_reduce3<kWarps>(a, mn, mx);
  if (threadIdx.x == 0) {
    partial[3 * blockIdx.x] = a;
    partial[3 * blockIdx.x + 1] = mn;
    partial[3 * blockIdx.x + 2] = mx;
  }
}

__device__ void combine_partials(const float* partial, int blocks, float r[3]) {
  r[0] = 0.0f;
  r[1] = INFINITY;
  r[2] = -INFINITY;
  for (int b = 0; b < blocks; ++b) {
    r[0] = nan_max(r[0], partial[3 * b]);
    r[1] = nan_min(r[1], partial[3 * b + 1]);
    r[2] = nan_max(r[2], partial[3 * b + 2]);
  }
}

__global__ void finalize_tensor_scale_kernel(const float* partial, int blocks, int bits, bool symmetric, float* scale,
                                             int8_t* zp) {
  float r[3];
  combine_partials(partial, blocks, r);
  float s;
  int8_t z = 0;
  if (symmetric)
    s = scale_from_absmax(r[0], bits);
  else
    scale_zp_from_minmax(r[1], r[2], bits, &s, &z);
  scale[0] = s;
  zp[0] = z;
}

// The EMA step is quant_math.h ema_step, the code the CPU runs (plain fp32
// ops: this library is built with -fmad=false, so nothing is contracted into
// an FMA and the state evolves exactly as in the reference). Non-finite
// observations are skipped there.
__global__ void ema_update_kernel(const float* partial, int blocks, float* state, float a, float b, float e, int bits,
                                  bool symmetric, bool update, float* scale, int8_t* zp) {
  float src[3] = {state[0], state[1], state[2]};
  if (update) {
    float r[3] = {0.0f, 0.0f, 0.0f};
    if (partial) combine_partials(partial, blocks, r);
    ema_step(state, r, a, b, e, src);
  }
  float s;
  int8_t z = 0;
  if (symmetric) {
    s = scale_from_absmax(src[0], bits);
  } else {
    const float hi = nan_max(src[2], __fadd_rn(src[1], e));
    scale_zp_from_minmax(src[1], hi, bits, &s, &z);
  }
  scale[0] = s;
  zp[0] = z;
}

__global__ void dequantize_kernel(const void* __restrict__ q, int64_t rows, int64_t K, int bits, int64_t g,
                                  const float* __restrict__ scale, const int8_t* __restrict__ zp, int64_t sstride,
                                  void* __restrict__ out, FloatType t) {
  const int64_t Kq = bits == 4 ? (K + 1) / 2 : K;
  const int64_t n = rows * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / K, c = i % K;
    int v;
    if (bits == 8) {
      v = static_cast<const int8_t*>(q)[row * Kq + c];
    } else {
      const int byte = static_cast<const uint8_t*>(q)[row * Kq + c / 2];
      v = (c & 1) ? (byte >> 4) : (byte & 0xf);
      v = v >= 8 ? v - 16 : v;
    }
    const int64_t si = row * sstride + c / g;
    store_f(out, i, __fmul_rn(scale[si], static_cast<float>(v - zp[si])), t);
  }
}

// The same, 8 consecutive values of one row per thread on a 2-D grid (x
// along the row, y over rows): the per-element 64-bit division and modulo of
// dequantize_kernel (most of its time on H100, docs/benchmarks.md) become one
// multiply-add per 8 values, the weights come in one 8-byte (int8) or 4-byte
// (int4) load and the output goes out in 16-byte stores. Needs K % 8 == 0,
// g % 8 == 0 (the 8 values share a scale) and aligned rows; dequantize()
// picks the scalar kernel otherwise. The same float operations per element:
// bit-exact with dequantize_kernel. Compiled, not yet validated on a GPU.
constexpr int kVecThreads = 256;
__global__ void __launch_bounds__(kVecThreads)
    dequantize_vec8_kernel(const void* __restrict__ q, int64_t rows, int64_t K, int bits, int64_t g,
                           const float* __restrict__ scale, const int8_t* __restrict__ zp, int64_t sstride,
                           void* __restrict__ out, FloatType t) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kVecThreads + threadIdx.x) * 8;
  if (c0 >= K) return;
  const int64_t Kq = bits == 4 ? K / 2 : K;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    int v[8];
    if (bits == 8) {
      const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const int8_t*>(q) + row * Kq + c0);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = static_cast<int8_t>(((j < 4 ? u.x : u.y) >> (8 * (j & 3))) & 0xffu);
    } else {
      // value 2b is the low nibble of byte b: nibble j of the word is value j
      const uint32_t u = *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(q) + row * Kq + c0 / 2);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int nib = static_cast<int>((u >> (4 * j)) & 0xfu);
        v[j] = nib >= 8 ? nib - 16 : nib;
      }
    }
    const int64_t si = row * sstride + c0 / g;
    const float sc = scale[si];
    const int z = zp[si];
    float f[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = __fmul_rn(sc, static_cast<float>(v[j] - z));
    const int64_t o = row * K + c0;
    if (t == FloatType::F32) {
      float4* p = reinterpret_cast<float4*>(static_cast<float*>(out) + o);
      p[0] = make_float4(f[0], f[1], f[2], f[3]);
      p[1] = make_float4(f[4], f[5], f[6], f[7]);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (t == FloatType::BF16) {
          const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
          w[j] = *reinterpret_cast<const uint32_t*>(&h);
        } else {
          const __half2 h = __floats2half2_rn(f[2 * j], f[2 * j + 1]);
          w[j] = *reinterpret_cast<const uint32_t*>(&h);
        }
      }
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + o) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

constexpr int kStatCols = 32, kStatRows = 8, kRowsPerChunk = 256;

// Partial per-channel stats of a chunk of rows: block (32 columns, 8 row lanes).
__global__ void channel_stats_partial_kernel(const void* __restrict__ x, FloatType t, int64_t rows, int64_t K,
                                             int64_t ldx, float* __restrict__ ws) {
  __shared__ float sh[3][kStatRows][kStatCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kStatCols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t r1 = r0 + kRowsPerChunk < rows ? r0 + kRowsPerChunk : rows;
  float a = 0.0f, mn = INFINITY, mx = -INFINITY;
  if (c < K) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kStatRows) {
      const float v = load_f(x, r * ldx + c, t);
      a = nan_max(a, fabsf(v));
      mn = nan_min(mn, v);
      mx = nan_max(mx, v);
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = a;
  sh[1][threadIdx.y][threadIdx.x] = mn;
  sh[2][threadIdx.y][threadIdx.x] = mx;
  __syncthreads();
  if (threadIdx.y == 0 && c < K) {
    for (int y = 1; y < kStatRows; ++y) {
      a = nan_max(a, sh[0][y][threadIdx.x]);
      mn = nan_min(mn, sh[1][y][threadIdx.x]);
      mx = nan_max(mx, sh[2][y][threadIdx.x]);
    }
    float* w = ws + static_cast<int64_t>(blockIdx.y) * 3 * K;
    w[c] = a;
    w[K + c] = mn;
    w[2 * K + c] = mx;
  }
}

__global__ void channel_stats_fold_kernel(const float* __restrict__ ws, int chunks, int64_t K, float* absmax, float* mn,
                                          float* mx) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= K) return;
  float a = 0.0f, lo = INFINITY, hi = -INFINITY;
  for (int i = 0; i < chunks; ++i) {
    const float* w = ws + static_cast<int64_t>(i) * 3 * K;
    a = nan_max(a, w[c]);
    lo = nan_min(lo, w[K + c]);
    hi = nan_max(hi, w[2 * K + c]);
  }
  absmax[c] = nan_max(a, absmax[c]);
  mn[c] = nan_min(lo, mn[c]);
  mx[c] = nan_max(hi, mx[c]);
}

int grid_for(int64_t work, int per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<int>(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

}  // namespace

cudaError_t quantize_segments(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, int bits,
                              bool symmetric, int64_t g, bool write_q, void* q, float* scale, int8_t* zp,
                              cudaStream_t stream) {
  if (rows * K == 0) return cudaSuccess;
  if (g > (int64_t{1} << 30)) return cudaErrorInvalidValue;  // the kernel indexes a segment with int
  // g / 8 lanes per group for power-of-two groups of 8..128 values, else a warp
  const int lps = (g <= 128 && g >= 8 && (g & (g - 1)) == 0) ? static_cast<int>(g / 8) : 32;
  const int64_t warps = (rows * (K / g) + 32 / lps - 1) / (32 / lps);
  quantize_segments_kernel<<<grid_for(warps, kWarps), kThreads, 0, stream>>>(x, t, rows, K, ldx, bits, symmetric, g,
                                                                             write_q, q, scale, zp, lps);
  return cudaGetLastError();
}

cudaError_t quantize_with_scale(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, int bits, int64_t g,
                                const float* scale, const int8_t* zp, int64_t sstride, void* q, cudaStream_t stream) {
  const int64_t n = rows * (bits == 4 ? (K + 1) / 2 : K);
  if (n == 0) return cudaSuccess;
  quantize_with_scale_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(x, t, rows, K, ldx, bits, g, scale, zp,
                                                                             sstride, q);
  return cudaGetLastError();
}

int minmax_blocks(int64_t n) {
  const int64_t b = (n + kThreads * 16 - 1) / (kThreads * 16);
  return static_cast<int>(b < 1 ? 1 : (b > 1024 ? 1024 : b));
}

cudaError_t tensor_minmax_partial(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, float* partial,
                                  int blocks, cudaStream_t stream) {
  tensor_minmax_kernel<<<blocks, kThreads, 0, stream>>>(x, t, rows, K, ldx, partial);
  return cudaGetLastError();
}

cudaError_t finalize_tensor_scale(const float* partial, int blocks, int bits, bool symmetric, float* scale, int8_t* zp,
                                  cudaStream_t stream) {
  finalize_tensor_scale_kernel<<<1, 1, 0, stream>>>(partial, blocks, bits, symmetric, scale, zp);
  return cudaGetLastError();
}

cudaError_t ema_update_scale(const float* partial, int blocks, float* state, float alpha, float one_minus_alpha,
                             float eps, int bits, bool symmetric, bool update, float* scale, int8_t* zp,
                             cudaStream_t stream) {
  ema_update_kernel<<<1, 1, 0, stream>>>(partial, blocks, state, alpha, one_minus_alpha, eps, bits, symmetric, update,
                                         scale, zp);
  return cudaGetLastError();
}

cudaError_t dequantize(const void* q, int64_t rows, int64_t K, int bits, int64_t g, const float* scale,
                       const int8_t* zp, int64_t sstride, void* out, FloatType t, cudaStream_t stream) {
  if (rows * K == 0) return cudaSuccess;
  const uintptr_t qa = reinterpret_cast<uintptr_t>(q), oa = reinterpret_cast<uintptr_t>(out);
  if (K % 8 == 0 && g % 8 == 0 && qa % 8 == 0 && oa % 16 == 0 && (bits == 8 || bits == 4)) {
    const int64_t per_row = (K / 8 + kVecThreads - 1) / kVecThreads;
    const dim3 grid(static_cast<unsigned>(per_row), static_cast<unsigned>(rows < 65535 ? rows : 65535));
    dequantize_vec8_kernel<<<grid, kVecThreads, 0, stream>>>(q, rows, K, bits, g, scale, zp, sstride, out, t);
    return cudaGetLastError();
  }
  dequantize_kernel<<<grid_for(rows * K, kThreads), kThreads, 0, stream>>>(q, rows, K, bits, g, scale, zp, sstride,
                                                                           out, t);
  return cudaGetLastError();
}

int channel_stats_chunks(int64_t rows) { return static_cast<int>((rows + kRowsPerChunk - 1) / kRowsPerChunk); }

cudaError_t channel_stats_update(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, float* absmax,
                                 float* mn, float* mx, float* workspace, int chunks, cudaStream_t stream) {
  if (rows == 0 || K == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((K + kStatCols - 1) / kStatCols), static_cast<unsigned>(chunks));
  channel_stats_partial_kernel<<<grid, dim3(kStatCols, kStatRows), 0, stream>>>(x, t, rows, K, ldx, workspace);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  channel_stats_fold_kernel<<<static_cast<unsigned>((K + 255) / 256), 256, 0, stream>>>(workspace, chunks, K, absmax,
                                                                                       mn, mx);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmeq
