// Walsh-Hadamard transform on CUDA (semantics: cpu_kernels.h hadamard_transform,
// _reference.py). COMPILED, NOT YET VALIDATED ON A GPU: tests/test_hadamard_op.py
// has the CUDA cases (they skip without a GPU) and its SASS check runs on the
// CPU; until they have run on a device, treat results from here as unverified.
//
// One CTA per row (grid-stride over rows), the row in shared memory as fp32:
//  1. each thread loads 8 consecutive values (16-byte vector loads when
//     aligned), runs the stages h = 1, 2, 4 in registers, then h = 8 .. 128
//     with warp shuffles (lane bit h / 8 holds the partner), and stores them
//     to shared memory;
//  2. stages h = 256 .. p/2 in shared memory, one __syncthreads per stage;
//  3. out[a, b] = scale * sum_c had[a, c] y[c, b] (m = 1: scale * y), one
//     element per thread per step, written in x's dtype.
// The butterflies are the CPU's (u + v, u - v) and the cross-block sum keeps
// its order with had * y + acc fused, as in the AVX2 path: the same fp32 result
// as the CPU kernels for +-1 matrices (up to the device's IEEE conformance).
#include <algorithm>
#include <mutex>

#include "common.cuh"

namespace llmeq {
namespace cuda {
namespace {

constexpr int kMaxThreads = 1024;

template <FloatType T>
__global__ void __launch_bounds__(kMaxThreads)
    hadamard_kernel(const void* __restrict__ x, int64_t rows, int64_t ldx, int n, int log2p,
                    const float* __restrict__ had, int m, float scale, void* __restrict__ out, bool vec) {
  extern __shared__ float y[];
  const int p = 1 << log2p;
  const int nch = (n + 7) / 8;
  const int lane = threadIdx.x & 31;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t x0 = row * ldx;
    // Every lane of a warp runs the shuffles (chunks past the row hold 0):
    // a round covers blockDim.x chunks, a warp 32 aligned ones (256 values).
    for (int base = 0; base < nch; base += blockDim.x) {
      const int ch = base + threadIdx.x;
      float v[8];
      if (ch < nch && vec) {
        load8(x, x0 + 8 * ch, T, true, v);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = ch < nch && 8 * ch + j < n ? load_f(x, x0 + 8 * ch + j, T) : 0.0f;
      }
#pragma unroll
      for (int h = 1; h < 8; h *= 2) {
        if (h >= p) break;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (!(j & h)) {
            const float u = v[j], w = v[j + h];
            v[j] = u + w;
            v[j + h] = u - w;
          }
      }
#pragma unroll
      for (int h = 8; h < 256; h *= 2) {
        if (h >= p) break;
        const int o = h / 8;
        const bool upper = lane & o;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float w = __shfl_xor_sync(0xffffffffu, v[j], o);
          v[j] = upper ? w - v[j] : v[j] + w;  // partner - own = u - v on the upper lane
        }
      }
      if (ch < nch) {
        if (n % 8 == 0) {
          float4* d = reinterpret_cast<float4*>(y + 8 * ch);
          d[0] = make_float4(v[0], v[1], v[2], v[3]);
          d[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (8 * ch + j < n) y[8 * ch + j] = v[j];
        }
      }
    }
    __syncthreads();
    for (int lh = 8; lh < log2p; ++lh) {
      const int h = 1 << lh;
      for (int k = threadIdx.x; k < n / 2; k += blockDim.x) {
        const int i = ((k >> lh) << (lh + 1)) | (k & (h - 1));
        const float u = y[i], w = y[i + h];
        y[i] = u + w;
        y[i + h] = u - w;
      }
      __syncthreads();
    }
    const int64_t o0 = row * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      float z;
      if (had == nullptr) {
        z = y[i];
      } else {
        const int b = i & (p - 1);
        const float* hr = had + (i >> log2p) * m;
        z = __ldg(hr) * y[b];
        for (int c = 1; c < m; ++c) z = __fmaf_rn(__ldg(hr + c), y[c * p + b], z);
      }
      store_f(out, o0 + i, z * scale, T);
    }
    __syncthreads();  // y is rewritten by the next row
  }
}

template <FloatType T>
cudaError_t launch(const void* x, int64_t rows, int64_t n, int64_t ldx, const float* had, int64_t m, float scale,
                   void* out, cudaStream_t stream) {
  auto kernel = hadamard_kernel<T>;
  const int smem = static_cast<int>(n) * 4;
  if (smem > 48 * 1024) {
    // Raise the kernel's dynamic shared-memory cap when a row needs more than
    // this device was raised to (a device whose opt-in limit is lower, e.g.
    // sm_86's 99 KiB, returns the error here: the op reports it).
    static std::mutex mu;  // the attribute is only ever raised, under the lock
    static int raised[64] = {};
    int dev = 0;
    cudaGetDevice(&dev);
    const std::lock_guard<std::mutex> lock(mu);
    if (raised[dev & 63] < smem) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
      raised[dev & 63] = smem;
    }
  }
  int log2p = 0;
  while ((n / m) >> (log2p + 1)) ++log2p;
  const int64_t nch = (n + 7) / 8;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (nch + 31) / 32 * 32)));
  const int64_t es = T == FloatType::F32 ? 4 : 2;
  const bool vec = n % 8 == 0 && (ldx * es) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t{1} << 30));
  kernel<<<grid, threads, smem, stream>>>(x, rows, ldx, static_cast<int>(n), log2p, had, static_cast<int>(m), scale,
                                          out, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t hadamard_transform(const void* x, FloatType t, int64_t rows, int64_t n, int64_t ldx, const float* had,
                               int64_t m, float scale, void* out, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  if (had == nullptr) m = 1;
  if (n > kHadamardMaxN || m <= 0 || n % m) return cudaErrorInvalidValue;
  switch (t) {
    case FloatType::F32: return launch<FloatType::F32>(x, rows, n, ldx, had, m, scale, out, stream);
    case FloatType::BF16: return launch<FloatType::BF16>(x, rows, n, ldx, had, m, scale, out, stream);
    case FloatType::F16: return launch<FloatType::F16>(x, rows, n, ldx, had, m, scale, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace llmeq
