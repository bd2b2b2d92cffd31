// Torch-free CUDA microbenchmark of the kernels in src/cuda (issue 3):
// int8 GEMM (mma.sync) and GEMV (dp4a) through llmeq::cuda::gemm_s8, the
// weight-only GEMM and the per-token quantize kernel. cudaEvent timing,
// weights rotated over enough copies to exceed L2, median of the runs.
// Prints µs, TOPS (or GB/s) and the fraction of the measured copy bandwidth.
// A correctness check (int32 exact vs a CPU loop) runs first on one shape.
//
// Build (scripts/gpu_check.sh does this):
//   nvcc -O2 -std=c++20 -arch=sm_90a -Isrc/cpp/include benchmarks/cpp/bench_cuda.cu \
//        src/cuda/gemm_s8.cu src/cuda/gemm_wo.cu src/cuda/quantize.cu -o bench_cuda
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "llmeq/cuda_kernels.h"

using namespace llmeq;

#define CK(x)                                                                                      \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));      \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

static float median_us(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2] * 1e3f;
}

template <class F>
static float time_us(F&& f, int copies, int reps = 120) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 5; ++i) f(i % copies);
  // batches of 10 back-to-back calls: device time per call
  std::vector<float> t;
  for (int r = 0; r < reps / 10; ++r) {
    CK(cudaEventRecord(a));
    for (int i = 0; i < 10; ++i) f((r * 10 + i) % copies);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / 10);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return median_us(t);
}

static void fill_random_s8(int8_t* d, size_t n, unsigned seed) {
  std::vector<int8_t> h(n);
  srand(seed);
  for (auto& v : h) v = static_cast<int8_t>(rand() % 256 - 128);
  CK(cudaMemcpy(d, h.data(), n, cudaMemcpyHostToDevice));
}

static bool check_gemm(int M, int N, int K, int sms, cuda::GemmPath path) {
  int8_t *A, *B;
  int32_t *C, *ws = nullptr;
  CK(cudaMalloc(&A, size_t(M) * K));
  CK(cudaMalloc(&B, size_t(N) * K));
  CK(cudaMalloc(&C, size_t(M) * N * 4));
  fill_random_s8(A, size_t(M) * K, 1);
  fill_random_s8(B, size_t(N) * K, 2);
  const int64_t wsn = cuda::gemm_s8_workspace(M, N, K, sms, path);
  if (wsn) CK(cudaMalloc(&ws, wsn * 4));
  cuda::Epilogue ep;
  ep.out = C;
  ep.ldo = N;
  ep.kind = cuda::OutKind::I32;
  CK(cuda::gemm_s8(M, N, K, A, K, B, K, ep, ws, sms, path, 0));
  CK(cudaDeviceSynchronize());
  std::vector<int8_t> ha(size_t(M) * K), hb(size_t(N) * K);
  std::vector<int32_t> hc(size_t(M) * N);
  CK(cudaMemcpy(ha.data(), A, ha.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hb.data(), B, hb.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hc.data(), C, hc.size() * 4, cudaMemcpyDeviceToHost));
  bool ok = true;
  for (int m = 0; m < M && ok; ++m)
    for (int n = 0; n < N && ok; ++n) {
      int32_t r = 0;
      for (int k = 0; k < K; ++k) r += int32_t(ha[size_t(m) * K + k]) * hb[size_t(n) * K + k];
      if (r != hc[size_t(m) * N + n]) {
        std::printf("MISMATCH M=%d N=%d K=%d at (%d,%d): %d vs %d\n", M, N, K, m, n, hc[size_t(m) * N + n], r);
        ok = false;
      }
    }
  cudaFree(A);
  cudaFree(B);
  cudaFree(C);
  if (ws) cudaFree(ws);
  return ok;
}

// `bench_cuda --one M N K`: one GEMM launch (bf16 out) and exit, for profilers (ncu).
static int run_one(int M, int N, int K, int sms) {
  int8_t *A, *B;
  float *as, *bs;
  void* out;
  int32_t* ws = nullptr;
  CK(cudaMalloc(&A, size_t(M) * K));
  CK(cudaMalloc(&B, size_t(N) * K));
  fill_random_s8(A, size_t(M) * K, 1);
  fill_random_s8(B, size_t(N) * K, 2);
  CK(cudaMalloc(&as, M * 4));
  CK(cudaMalloc(&bs, N * 4));
  CK(cudaMemset(as, 0, M * 4));
  CK(cudaMemset(bs, 0, N * 4));
  CK(cudaMalloc(&out, size_t(M) * N * 2));
  const int64_t wsn = cuda::gemm_s8_workspace(M, N, K, sms, cuda::GemmPath::Auto);
  if (wsn) CK(cudaMalloc(&ws, wsn * 4));
  cuda::Epilogue ep;
  ep.a_scale = as;
  ep.b_scale = bs;
  ep.out = out;
  ep.ldo = N;
  ep.kind = cuda::OutKind::BF16;
  for (int i = 0; i < 3; ++i) CK(cuda::gemm_s8(M, N, K, A, K, B, K, ep, ws, sms, cuda::GemmPath::Auto, 0));
  CK(cudaDeviceSynchronize());
  return 0;
}

int main(int argc, char** argv) {
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, 0));
  const int sms = p.multiProcessorCount;
  if (argc == 5 && std::string(argv[1]) == "--one") return run_one(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), sms);
  const size_t l2 = p.l2CacheSize;
  std::printf("device: %s, %d SMs, L2 %zu MiB\n", p.name, sms, l2 >> 20);

  bool ok = true;
  for (auto path : {cuda::GemmPath::Auto, cuda::GemmPath::Mma})
    for (int M : {1, 7, 33, 130, 300}) ok &= check_gemm(M, 257, 1040, sms, path);
  std::printf("correctness (int32 exact vs CPU): %s\n", ok ? "ok" : "FAILED");

  // copy bandwidth (read + write) as the memory ceiling
  const size_t cb = size_t(512) << 20;
  void *c0, *c1;
  CK(cudaMalloc(&c0, cb));
  CK(cudaMalloc(&c1, cb));
  const float tc = time_us([&](int) { CK(cudaMemcpyAsync(c1, c0, cb, cudaMemcpyDeviceToDevice)); }, 1, 20);
  const double copy_gbps = 2.0 * cb / tc / 1e3;
  cudaFree(c0);
  cudaFree(c1);
  std::printf("copy: %.0f GB/s (read+write)\n\n", copy_gbps);

  std::printf("%-10s %6s %6s %6s %10s %10s %12s %s\n", "kernel", "M", "N", "K", "us", "TOPS", "weight GB/s",
              "% of copy");
  const int NK[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  for (auto& nk : NK) {
    const int N = nk[0], K = nk[1];
    const size_t wbytes = size_t(N) * K;
    const int copies = int(std::max<size_t>(2, std::min<size_t>(16, 3 * l2 / wbytes + 1)));
    std::vector<int8_t*> W(copies);
    for (auto& w : W) {
      CK(cudaMalloc(&w, wbytes));
      fill_random_s8(w, wbytes, 3);
    }
    for (int M : {1, 2, 4, 8, 16, 128, 2048}) {
      int8_t* A;
      float *as, *bs;
      void* out;
      int32_t* ws = nullptr;
      CK(cudaMalloc(&A, size_t(M) * K));
      fill_random_s8(A, size_t(M) * K, 4);
      CK(cudaMalloc(&as, M * 4));
      CK(cudaMalloc(&bs, N * 4));
      CK(cudaMemset(as, 0, M * 4));
      CK(cudaMemset(bs, 0, N * 4));
      CK(cudaMalloc(&out, size_t(M) * N * 2));
      for (auto path : {cuda::GemmPath::Auto, cuda::GemmPath::Mma}) {
        if (path == cuda::GemmPath::Mma && M > cuda::kDp4aMaxM) continue;
        const int64_t wsn = cuda::gemm_s8_workspace(M, N, K, sms, path);
        if (wsn) CK(cudaMalloc(&ws, wsn * 4));
        cuda::Epilogue ep;
        ep.a_scale = as;
        ep.b_scale = bs;
        ep.out = out;
        ep.ldo = N;
        ep.kind = cuda::OutKind::BF16;
        const float t = time_us(
            [&](int i) { CK(cuda::gemm_s8(M, N, K, A, K, W[i], K, ep, ws, sms, path, 0)); }, copies);
        const double gbps = double(wbytes) / t / 1e3;
        const char* name = (path == cuda::GemmPath::Mma || M > cuda::kDp4aMaxM) ? "s8-mma" : "s8-dp4a";
        std::printf("%-10s %6d %6d %6d %10.1f %10.1f %12.0f %5.0f%%\n", name, M, N, K, t,
                    2.0 * M * N * K / t / 1e6, gbps, 100 * gbps / copy_gbps);
        if (ws) {
          cudaFree(ws);
          ws = nullptr;
        }
      }
      cudaFree(A);
      cudaFree(as);
      cudaFree(bs);
      cudaFree(out);
    }
    for (auto w : W) cudaFree(w);
  }

  // per-token int8 quantize of a 64 MiB bf16 activation
  const int64_t R = 8192, K = 4096;
  void* x;
  int8_t *q, *zp;
  float* sc;
  CK(cudaMalloc(&x, R * K * 2));
  CK(cudaMemset(x, 0x3c, R * K * 2));
  CK(cudaMalloc(&q, R * K));
  CK(cudaMalloc(&sc, R * 4));
  CK(cudaMalloc(&zp, R));
  const float tq = time_us([&](int) {
    CK(cuda::quantize_segments(x, cuda::FloatType::BF16, R, K, K, 8, true, K, true, q, sc, zp, 0));
  }, 1, 30);
  const double qb = double(R * K * 3 + R * 5) / tq / 1e3;
  std::printf("\nquantize per-token int8 %lldx%lld bf16: %.1f us, %.0f GB/s (%.0f%% of copy)\n", (long long)R,
              (long long)K, tq, qb, 100 * qb / copy_gbps);
  return ok ? 0 : 1;
}
