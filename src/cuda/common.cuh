// Device helpers shared by the CUDA kernels: typed loads/stores of the three
// float dtypes, warp reductions, and thin wrappers of the PTX instructions the
// GEMMs are built on (cp.async, ldmatrix, mma.sync). Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "llmeq/cuda_kernels.h"
#include "llmeq/quant_math.h"

namespace llmeq {
namespace cuda {

// ---- float dtypes -----------------------------------------------------------
__device__ __forceinline__ float load_f(const void* p, int64_t i, FloatType t) {
  if (t == FloatType::F32) return static_cast<const float*>(p)[i];
  if (t == FloatType::BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

// Round-to-nearest-even conversions: the same rounding as torch's .to(dtype).
__device__ __forceinline__ void store_f(void* p, int64_t i, float v, FloatType t) {
  if (t == FloatType::F32)
    static_cast<float*>(p)[i] = v;
  else if (t == FloatType::BF16)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else
    static_cast<__half*>(p)[i] = __float2half_rn(v);
}

__device__ __forceinline__ int elem_bytes(FloatType t) { return t == FloatType::F32 ? 4 : 2; }

// Eight consecutive values starting at p + i (16- or 32-byte aligned vector
// loads when `vec`, else scalar loads).
__device__ __forceinline__ void load8(const void* p, int64_t i, FloatType t, bool vec, float v[8]) {
  if (vec) {
    if (t == FloatType::F32) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      const float4 a = q[0], b = q[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (t == FloatType::BF16) {
          v[2 * j] = __uint_as_float(w[j] << 16);
          v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        } else {
          v[2 * j] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[j] & 0xffffu)));
          v[2 * j + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[j] >> 16)));
        }
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = load_f(p, i + j, t);
  }
}

// ---- 16-bit float bits (bf16 or fp16 by template; the GEMMs' outputs) -------
// Round to nearest even, as torch's .to(dtype). pack_pair: low half = lo.
template <bool BF16>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (BF16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
template <bool BF16>
__device__ __forceinline__ uint16_t half_bits(float v) {
  if constexpr (BF16) {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
  } else {
    const __half h = __float2half_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
  }
}

// ---- reductions (NaN-propagating, like torch.maximum) -----------------------
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = nan_min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// absmax / min / max over a block of WARPS warps; the result is in warp 0.
// Starts with no barrier: a caller reusing it in a loop needs one between
// warp 0's read of the previous result and the next call.
template <int WARPS>
__device__ __forceinline__ void block_reduce3(float& a, float& mn, float& mx) {
  __shared__ float sh[3][WARPS];
  a = warp_max(a);
  mn = warp_min(mn);
  mx = warp_max(mx);
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sh[0][w] = a;
    sh[1][w] = mn;
    sh[2][w] = mx;
  }
  __syncthreads();
  if (w == 0) {
    a = lane < WARPS ? sh[0][lane] : 0.0f;
    mn = lane < WARPS ? sh[1][lane] : INFINITY;
    mx = lane < WARPS ? sh[2][lane] : -INFINITY;
    a = warp_max(a);
    mn = warp_min(mn);
    mx = warp_max(mx);
  }
}

// Eight int8 values (in int) to q + i: one 8-byte store when `vec` (aligned).
__device__ __forceinline__ void write_q8(int8_t* q, int64_t i, const int v[8], bool vec) {
  if (vec) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      lo |= (static_cast<uint32_t>(v[j]) & 0xffu) << (8 * j);
      hi |= (static_cast<uint32_t>(v[j + 4]) & 0xffu) << (8 * j);
    }
    *reinterpret_cast<uint2*>(q + i) = make_uint2(lo, hi);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) q[i + j] = static_cast<int8_t>(v[j]);
  }
}

// ---- PTX wrappers -------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes < 16 zero-fills the rest (used for
// rows and K chunks outside the matrix, which must contribute 0).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void mma_s8_16832(int c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <bool BF16>
__device__ __forceinline__ void mma_h_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace llmeq
