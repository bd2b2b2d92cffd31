// Torch-free microbenchmark + self-check of the CPU kernels.
//
//   OMP_WAIT_POLICY=ACTIVE ./bench_kernels [--threads N] [--quick] [--check-only]
//                                          [--only gemm|wo|w4a8|quant|peak] [--isa NAME]
//                                          [--expect-isa NAME]
//
// --expect-isa NAME: exit 2 unless the tier in use (detected, capped by
// LLMEQ_CPU_ISA) is NAME, so a check that is meant to cover a tier (make
// check-arm under qemu -cpu max / cortex-a57) cannot silently cover less.
//
// 1. Self-check (exit code 1 on any failure): every SIMD path available on this
//    CPU against the scalar path, bit-for-bit (int32 products and the fp32 /
//    bf16 / fp16 fused epilogue), on odd shapes, padded strides, extreme values
//    and a sample of the benchmark shapes; the scalar path against a naive
//    int64 reference; gemm_weight_only against a double-precision reference
//    (tolerance: fp32 accumulation order is free on x86; the Arm tiers keep
//    the scalar order and are also compared with scalar bit-for-bit);
//    gemm_w4a8: every tier bit-for-bit against the contract written out here
//    (exact int64 group products, the fp32 steps one rounding each);
//    hadamard_transform: tiers bit-for-bit against scalar for +-1 matrices,
//    within 1e-5 relative for general fp32 ones (AVX2 fuses had * y + acc),
//    scalar against a naive double sum.
// 2. Timing (median of >= 20 runs after warm-up, min..max in brackets):
//    gemm_u8s8_scaled GOP/s (2*M*N*K / t) per ISA; at M <= 16 also GB/s on
//    weight bytes, "hot" (one weight copy, LLC resident when it fits) and
//    "cold" (rotating copies whose total exceeds the 32 MiB L3);
//    gemm_weight_only GB/s on weight bytes at M = 1, 16, 128 (scalar: 1, 16
//    only) and GFLOP/s; gemm_w4a8 GOP/s at M = 1, 16, 128, 512; quantize_dynamic GB/s
//    on input bytes (per-row symmetric 8-bit, fp32 [M, K]).
//
// Build without src/cpp/kernels/quantize.cpp: -DLLMEQ_BENCH_NO_QUANTIZE.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"  // bf16 <-> fp32 (the hadamard check)

using namespace llmeq::cpu;

namespace {

int g_threads = 2;
std::string g_time_isa;  // --isa: time only this ISA (the self-check covers all)
bool g_quick = false;
int g_failures = 0;
std::mt19937_64 g_rng(12345);

// Highest ISA exercised: active_isa() at startup, so LLMEQ_CPU_ISA caps the
// bench like it caps the library.
Isa g_cap = Isa::Scalar;

void set_isa(Isa isa) { setenv("LLMEQ_CPU_ISA", isa_name(isa), 1); }

// Every SIMD tier at or below the cap on its chain (x86-64: avx2,
// avx512_vnni, avx512_amx; aarch64: neon, neon_dotprod); the cap never exceeds what this
// CPU runs, and a build has only its own architecture's tiers.
std::vector<Isa> simd_isas() {
  std::vector<Isa> v;
  for (Isa i : {Isa::Avx2, Isa::Avx512Vnni, Isa::Avx512Amx, Isa::Neon, Isa::NeonDotprod})
    if (i != Isa::Scalar && isa_within(i, g_cap)) v.push_back(i);
  return v;
}

std::vector<Isa> all_isas() {
  std::vector<Isa> v{Isa::Scalar};
  for (Isa i : simd_isas()) v.push_back(i);
  return v;
}

std::vector<Isa> timed_isas() {
  std::vector<Isa> v;
  for (Isa i : all_isas())
    if (g_time_isa.empty() || g_time_isa == isa_name(i)) v.push_back(i);
  return v;
}

template <typename V>
void fill_int(V& v, int lo, int hi) {
  using T = typename V::value_type;
  std::uniform_int_distribution<int> d(lo, hi);
  for (auto& e : v) e = static_cast<T>(d(g_rng));
}

template <typename V>
void fill_float(V& v, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  for (auto& e : v) e = d(g_rng);
}

// 64-byte aligned storage for the timed buffers, like torch's CPU allocator:
// unaligned 64-byte rows split every zmm load over two cache lines (measured
// ~25 % slower at M = 16).  The self-check uses plain exact-size vectors.
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const AlignedAlloc&) const { return true; }
  bool operator!=(const AlignedAlloc&) const { return false; }
};
template <typename T>
using avec = std::vector<T, AlignedAlloc<T>>;

void fail(const char* what, const std::string& ctx) {
  ++g_failures;
  if (g_failures <= 30) std::printf("  FAIL %s: %s\n", what, ctx.c_str());
}

std::string shape_str(int64_t M, int64_t N, int64_t K) {
  char b[96];
  std::snprintf(b, sizeof b, "M=%lld N=%lld K=%lld", (long long)M, (long long)N, (long long)K);
  return b;
}

// ---------------------------------------------------------------------------
// int8 GEMM checks
// ---------------------------------------------------------------------------
struct GemmCase {
  int64_t M, N, K, lda, ldb, ldc;
  std::vector<uint8_t> A;
  std::vector<int8_t> B;
};

GemmCase make_case(int64_t M, int64_t N, int64_t K, int64_t pad, int mode) {
  GemmCase c{M, N, K, K + pad, K + pad, N + pad, {}, {}};
  // Exact-size buffers (no slack after the last row): ASan catches over-reads.
  c.A.resize(static_cast<size_t>(M > 0 ? (M - 1) * c.lda + K : 0));
  c.B.resize(static_cast<size_t>(N > 0 ? (N - 1) * c.ldb + K : 0));
  if (mode == 0) {
    fill_int(c.A, 0, 255);
    fill_int(c.B, -128, 127);
  } else {  // extremes: largest |acc|
    std::fill(c.A.begin(), c.A.end(), 255);
    for (size_t i = 0; i < c.B.size(); ++i) c.B[i] = (mode == 1) ? -128 : 127;
  }
  return c;
}

// B in the pre-packed panel layout, written out from cpu_kernels.h's formula
// here (not by pack_s8_panels, which is checked against it).
std::vector<int8_t> pack_case(const GemmCase& c) {
  const int64_t pb = s8_panel_bytes(c.K), panels = (c.N + kS8PanelCols - 1) / kS8PanelCols;
  std::vector<int8_t> Bp(static_cast<size_t>(panels * pb), 0);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t k = 0; k < c.K; ++k)
      Bp[(n / 64) * pb + ((k / 4) * 64 + n % 64) * 4 + k % 4] = c.B[n * c.ldb + k];
  if (c.N > 0) {
    std::vector<int8_t> lib(Bp.size(), 0x77);
    pack_s8_panels(c.B.data(), c.N, c.K, c.ldb, lib.data());
    if (lib != Bp) fail("pack_s8_panels != the layout formula", shape_str(c.M, c.N, c.K));
  }
  return Bp;
}

std::vector<int32_t> run_int(const GemmCase& c, Isa isa) {
  set_isa(isa);
  const size_t csize = static_cast<size_t>(c.M > 0 ? (c.M - 1) * c.ldc + c.N : 0);
  std::vector<int32_t> C(csize, 0x5a5a5a5a);  // sentinel: padding must survive
  gemm_u8s8s32(c.M, c.N, c.K, c.A.data(), c.lda, c.B.data(), c.ldb, C.data(), c.ldc, g_threads);
  return C;
}

void check_int(int64_t M, int64_t N, int64_t K, int64_t pad, int mode = 0, bool naive = true) {
  GemmCase c = make_case(M, N, K, pad, mode);
  const std::string ctx = shape_str(M, N, K) + " pad=" + std::to_string(pad);
  const std::vector<int32_t> ref = run_int(c, Isa::Scalar);
  if (naive) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        int64_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += int64_t(c.A[m * c.lda + k]) * c.B[n * c.ldb + k];
        if (ref[m * c.ldc + n] != s) {
          fail("scalar vs naive int64", ctx);
          return;
        }
      }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = N; n < c.ldc && m * c.ldc + n < (int64_t)ref.size(); ++n)
      if (ref[m * c.ldc + n] != 0x5a5a5a5a) fail("scalar wrote padding", ctx);
  for (Isa isa : simd_isas()) {
    const std::vector<int32_t> got = run_int(c, isa);
    if (got != ref) fail((std::string(isa_name(isa)) + " int32 != scalar").c_str(), ctx);
  }
  // The pre-packed layout, every tier (scalar included: its own loop), must
  // give the row-major scalar product exactly.
  const std::vector<int8_t> Bp = pack_case(c);
  for (Isa isa : all_isas()) {
    set_isa(isa);
    std::vector<int32_t> got(ref.size(), 0x5a5a5a5a);
    gemm_u8s8s32_prepacked(c.M, c.N, c.K, c.A.data(), c.lda, Bp.data(), got.data(), c.ldc, g_threads);
    if (got != ref) fail((std::string(isa_name(isa)) + " prepacked int32 != scalar").c_str(), ctx);
  }
}

std::vector<uint16_t> run_scaled(const GemmCase& c, Isa isa, const GemmEpilogue& ep0,
                                 int64_t ldo, const std::vector<int8_t>* Bp = nullptr) {
  set_isa(isa);
  const size_t elems = static_cast<size_t>(c.M > 0 ? (c.M - 1) * ldo + c.N : 0);
  const size_t esize = ep0.out_type == FloatType::F32 ? 4 : 2;
  std::vector<uint16_t> out(elems * esize / 2, 0xa5a5);
  GemmEpilogue ep = ep0;
  ep.out = out.data();
  ep.ldo = ldo;
  if (Bp != nullptr) {
    gemm_u8s8_prepacked_scaled(c.M, c.N, c.K, c.A.data(), c.lda, Bp->data(), ep, g_threads);
  } else {
    gemm_u8s8_scaled(c.M, c.N, c.K, c.A.data(), c.lda, c.B.data(), c.ldb, ep, g_threads);
  }
  return out;
}

void check_scaled(int64_t M, int64_t N, int64_t K, int64_t pad) {
  GemmCase c = make_case(M, N, K, pad, 0);
  std::vector<float> a_scale(std::max<int64_t>(M, 1)), b_scale(N), bias(N);
  std::vector<int32_t> a_corr(std::max<int64_t>(M, 1)), b_sum(N);
  fill_float(a_scale, 1e-4f, 1e-2f);
  fill_float(b_scale, 1e-4f, 1e-2f);
  fill_float(bias, -1.f, 1.f);
  fill_int(a_corr, 100, 156);
  for (int64_t n = 0; n < N; ++n) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += c.B[n * c.ldb + k];
    b_sum[n] = s;
  }
  // Exercise the fp16/bf16 special cases: huge scales overflow fp16 to inf.
  if (N > 2) b_scale[2] = 1e3f;
  // ... and NaN / inf biases must come out as NaN / inf in every format.
  if (N > 4) bias[3] = std::numeric_limits<float>::quiet_NaN();
  if (N > 5) bias[4] = -std::numeric_limits<float>::infinity();
  const int64_t ldo = N + pad;
  const std::vector<int8_t> Bp = pack_case(c);
  std::vector<int32_t> C = run_int(c, Isa::Scalar);
  for (int variant = 0; variant < 4; ++variant) {
    for (FloatType ot : {FloatType::F32, FloatType::BF16, FloatType::F16}) {
      GemmEpilogue ep;
      ep.a_scale = a_scale.data();
      ep.a_scale_stride = (variant & 1) ? 0 : 1;
      ep.b_scale = b_scale.data();
      if (variant & 2) {
        ep.a_corr = a_corr.data();
        ep.a_corr_stride = (variant & 1) ? 0 : 1;
        ep.b_sum = b_sum.data();
        ep.bias = bias.data();
      }
      ep.out_type = ot;
      const std::string ctx = shape_str(M, N, K) + " variant=" + std::to_string(variant) +
                              " out=" + std::to_string(int(ot));
      const std::vector<uint16_t> ref = run_scaled(c, Isa::Scalar, ep, ldo);
      if (ot == FloatType::F32) {  // scalar epilogue vs the formula on the int32 product
        const float* r = reinterpret_cast<const float*>(ref.data());
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            int32_t t = C[m * c.ldc + n];
            if (ep.a_corr) t -= ep.a_corr[m * ep.a_corr_stride] * b_sum[n];
            const float s = ep.a_scale[m * ep.a_scale_stride] * b_scale[n];
            float v = s * static_cast<float>(t);
            if (ep.bias) v = v + bias[n];
            if (std::memcmp(&v, &r[m * ldo + n], 4) != 0) {
              fail("scalar epilogue vs formula", ctx);
              m = M;
              break;
            }
          }
      }
      for (Isa isa : simd_isas()) {
        const std::vector<uint16_t> got = run_scaled(c, isa, ep, ldo);
        if (got != ref) fail((std::string(isa_name(isa)) + " scaled != scalar").c_str(), ctx);
      }
      for (Isa isa : all_isas()) {
        const std::vector<uint16_t> got = run_scaled(c, isa, ep, ldo, &Bp);
        if (got != ref) fail((std::string(isa_name(isa)) + " prepacked scaled != scalar").c_str(), ctx);
      }
    }
  }
}

void check_row_sums(int64_t N, int64_t K, int64_t pad) {
  std::vector<int8_t> B(static_cast<size_t>(N > 0 ? (N - 1) * (K + pad) + K : 0));
  fill_int(B, -128, 127);
  for (Isa isa : all_isas()) {
    set_isa(isa);
    std::vector<int32_t> out(N, 7);
    row_sums_s8(B.data(), N, K, K + pad, out.data(), g_threads);
    for (int64_t n = 0; n < N; ++n) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += B[n * (K + pad) + k];
      if (out[n] != s) {
        fail((std::string(isa_name(isa)) + " row_sums").c_str(), shape_str(1, N, K));
        break;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Weight-only checks
// ---------------------------------------------------------------------------
struct WoCase {
  int64_t M, N, K, g;
  int bits;
  std::vector<float> x, scale, bias;
  std::vector<uint8_t> W;
  std::vector<int8_t> zp;
};

int64_t wo_row_bytes(int64_t K, int bits) {
  return bits == 8 ? K : bits == 4 ? (K + 1) / 2 : (K + 7) / 8 * bits;
}

// Value k of a packed row, written out independently of quant_math.h: 4-bit
// two's-complement nibbles (element 2i low), 2/3-bit LSB-first stream of q - qmin.
int wo_value(const uint8_t* row, int64_t k, int bits) {
  if (bits == 8) return static_cast<int8_t>(row[k]);
  if (bits == 4) {
    const int nib = (k & 1) ? (row[k / 2] >> 4) : (row[k / 2] & 0xf);
    return nib >= 8 ? nib - 16 : nib;
  }
  int u = 0;
  for (int j = 0; j < bits; ++j) {
    const int64_t p = k * bits + j;
    u |= ((row[p / 8] >> (p % 8)) & 1) << j;
  }
  return u - (1 << (bits - 1));
}

WoCase make_wo(int64_t M, int64_t N, int64_t K, int bits, int64_t g, bool zp) {
  WoCase c{M, N, K, g, bits, {}, {}, {}, {}, {}};
  const int64_t G = K / g;
  c.x.resize(M * K);
  fill_float(c.x, -1.f, 1.f);
  c.scale.resize(N * G);
  fill_float(c.scale, 1e-3f, 2e-2f);
  c.bias.resize(N);
  fill_float(c.bias, -0.5f, 0.5f);
  const int64_t rb = wo_row_bytes(K, bits);
  c.W.resize(N * rb);
  if (bits == 8) {
    fill_int(c.W, 0, 255);
  } else {
    const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
    std::vector<int8_t> q(K);
    for (int64_t n = 0; n < N; ++n) {
      fill_int(q, qmin, qmax);
      uint8_t* row = c.W.data() + n * rb;
      std::memset(row, 0, rb);
      for (int64_t k = 0; k < K; ++k) {
        if (bits == 4) {
          row[k / 2] |= static_cast<uint8_t>((q[k] & 0xf) << ((k & 1) * 4));
        } else {
          const int u = q[k] - qmin;
          for (int j = 0; j < bits; ++j) {
            const int64_t p = k * bits + j;
            row[p / 8] |= static_cast<uint8_t>(((u >> j) & 1) << (p % 8));
          }
        }
      }
    }
  }
  if (zp) {
    c.zp.resize(N * G);
    if (bits == 8) fill_int(c.zp, -20, 20); else fill_int(c.zp, -3, 3);
  }
  return c;
}

void check_wo(int64_t M, int64_t N, int64_t K, int bits, int64_t g, bool zp, bool bias) {
  WoCase c = make_wo(M, N, K, bits, g, zp);
  const int64_t G = K / g, rb = wo_row_bytes(K, bits);
  std::vector<double> ref(M * N), mag(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int q = wo_value(c.W.data() + n * rb, k, bits);
        const int64_t gi = n * G + k / g;
        const double w = double(c.scale[gi]) * (q - (zp ? c.zp[gi] : 0));
        s += c.x[m * K + k] * w;
        a += std::fabs(c.x[m * K + k] * w);
      }
      ref[m * N + n] = s + (bias ? c.bias[n] : 0.0);
      mag[m * N + n] = a + (bias ? std::fabs(c.bias[n]) : 0.0);
    }
  std::vector<float> scalar_out;
  for (Isa isa : all_isas()) {
    set_isa(isa);
    std::vector<float> out(M * N, 1e30f);
    gemm_weight_only(M, N, K, c.x.data(), c.W.data(), bits, g, c.scale.data(),
                     zp ? c.zp.data() : nullptr, bias ? c.bias.data() : nullptr, out.data(),
                     g_threads);
    if (isa == Isa::Scalar) scalar_out = out;
    // The Arm tiers keep the scalar path's fp32 order (gemm_wo_neon.cpp):
    // bit-for-bit, on top of the tolerance below.
    if ((isa == Isa::Neon || isa == Isa::NeonDotprod) &&
        std::memcmp(out.data(), scalar_out.data(), out.size() * sizeof(float)) != 0) {
      char b[160];
      std::snprintf(b, sizeof b, "%s bits=%d g=%lld zp=%d bias=%d", shape_str(M, N, K).c_str(),
                    bits, (long long)g, zp, bias);
      fail((std::string(isa_name(isa)) + " weight_only != scalar (bits)").c_str(), b);
    }
    for (int64_t i = 0; i < M * N; ++i) {
      // fp32 accumulation: error <= ~K * 2^-24 * sum|terms|; allow 4x slack.
      const double tol = 4.0 * (K + 2) * 6e-8 * mag[i] + 1e-30;
      if (!(std::fabs(out[i] - ref[i]) <= tol)) {
        char b[160];
        std::snprintf(b, sizeof b, "%s bits=%d g=%lld zp=%d bias=%d i=%lld got %g want %g",
                      shape_str(M, N, K).c_str(), bits, (long long)g, zp, bias, (long long)i,
                      out[i], ref[i]);
        fail((std::string(isa_name(isa)) + " weight_only").c_str(), b);
        break;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// W4A8 checks
// ---------------------------------------------------------------------------
// Expected output written out from the contract in cpu_kernels.h (exact int64
// group products, then the fp32 steps one rounding each): every tier must
// equal it bit for bit.  extreme: activations +-128 / 127 and weights at
// -8 / 7 with zero-points at the far end, the largest |u * a| sums the AVX2
// tier's int16 accumulation must hold.
void check_w4a8(int64_t M, int64_t N, int64_t K, int64_t g, bool zp, bool bias, bool extreme = false) {
  WoCase c = make_wo(M, N, K, 4, g, zp);
  const int64_t G = K / g, rb = wo_row_bytes(K, 4);
  std::vector<int8_t> a(M * K);
  std::vector<float> as(M);
  fill_int(a, -128, 127);
  fill_float(as, 1e-3f, 3e-2f);
  if (extreme) {
    for (auto& v : a) v = (v & 1) ? 127 : -128;
    for (auto& b : c.W) b = (b & 1) ? 0x77 : 0x88;  // 7 | 7 or -8 | -8
    for (auto& z : c.zp) z = (z & 1) ? 7 : -8;
  }
  std::vector<float> want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t gi = 0; gi < G; ++gi) {
        int64_t p = 0;
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k)
          p += int64_t(a[m * K + k]) * (wo_value(c.W.data() + n * rb, k, 4) - (zp ? c.zp[n * G + gi] : 0));
        const volatile float prod = c.scale[n * G + gi] * static_cast<float>(p);
        acc = acc + prod;
      }
      const volatile float y = as[m] * acc;
      want[m * N + n] = bias ? y + c.bias[n] : y;
    }
  for (Isa isa : all_isas()) {
    set_isa(isa);
    std::vector<float> out(M * N, 1e30f);
    gemm_w4a8(M, N, K, a.data(), K, as.data(), c.W.data(), g, c.scale.data(), zp ? c.zp.data() : nullptr,
              bias ? c.bias.data() : nullptr, out.data(), g_threads);
    if (std::memcmp(out.data(), want.data(), out.size() * sizeof(float)) != 0) {
      int64_t i = 0;
      while (i < M * N && std::memcmp(&out[i], &want[i], sizeof(float)) == 0) ++i;
      char b[200];
      std::snprintf(b, sizeof b, "%s g=%lld zp=%d bias=%d extreme=%d i=%lld got %.9g want %.9g",
                    shape_str(M, N, K).c_str(), (long long)g, zp, bias, extreme, (long long)i, out[i], want[i]);
      fail((std::string(isa_name(isa)) + " w4a8").c_str(), b);
    }
  }
  // The pre-packed layout ("w4panel16"), written out here from cpu_kernels.h's
  // formula, on every tier: the same numbers bit for bit.
  const int64_t P = (N + kW4PanelCols - 1) / kW4PanelCols, pb = w4_panel_bytes(K);
  std::vector<uint8_t> wp(static_cast<size_t>(P * pb), 0x88);  // padding u = 8 in both nibbles
  std::vector<float> gp(static_cast<size_t>(P * G * 2 * kW4PanelCols), 1.0f);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t pi = n / 16, col = n % 16;
    for (int64_t k = 0; k < K; ++k) {
      const int u = wo_value(c.W.data() + n * rb, k, 4) + 8;
      uint8_t& byte = wp[pi * pb + (k / 8) * 64 + col * 4 + k % 4];
      byte = (k % 8) < 4 ? static_cast<uint8_t>((byte & 0xf0) | u) : static_cast<uint8_t>((byte & 0x0f) | (u << 4));
    }
    for (int64_t gi = 0; gi < G; ++gi) {
      gp[((pi * G + gi) * 2 + 0) * 16 + col] = c.scale[n * G + gi];
      gp[((pi * G + gi) * 2 + 1) * 16 + col] = 8.0f + (zp ? c.zp[n * G + gi] : 0);
    }
  }
  for (int64_t pi = 0; pi < P; ++pi)  // padding columns: zero-point 8 (u = 8 is q = 0)
    for (int64_t col = N - pi * 16; col < 16; ++col)
      for (int64_t gi = 0; gi < G && col >= 0; ++gi) gp[((pi * G + gi) * 2 + 1) * 16 + col] = 8.0f;
  for (Isa isa : all_isas()) {
    set_isa(isa);
    std::vector<float> out(M * N, 1e30f);
    gemm_w4a8_prepacked(M, N, K, a.data(), K, as.data(), wp.data(), gp.data(), g, bias ? c.bias.data() : nullptr,
                        out.data(), g_threads);
    if (std::memcmp(out.data(), want.data(), out.size() * sizeof(float)) != 0)
      fail((std::string(isa_name(isa)) + " w4a8 prepacked").c_str(),
           shape_str(M, N, K) + " g=" + std::to_string(g) + " zp=" + std::to_string(zp));
  }
}

void check_w4a8_all() {
  for (int64_t M : {1, 2, 3, 4, 5, 7, 13})
    for (int64_t N : {1, 3, 4, 5, 9}) {
      check_w4a8(M, N, 64, 32, true, true);
      check_w4a8(M, N, 256, 64, M % 2 == 0, N % 2 == 1);
      check_w4a8(M, N, 96, 96, true, false);  // per channel, 3 blocks
    }
  check_w4a8(3, 7, 100, 20, true, true);     // group off the 32-value grid: scalar path
  check_w4a8(2, 5, 99, 99, true, true);      // odd K
  check_w4a8(40, 37, 640, 64, true, true);   // several row tiles, unpacked panel
  check_w4a8(70, 11, 2048, 2048, false, true);  // per channel, > 8 blocks per group
  check_w4a8(9, 6, 1536, 512, true, true, true);
  check_w4a8(2, 6, 8192, 8192, true, true, true);
  check_w4a8(1, 50, 512, 128, true, true);   // pre-packed: panel ranges over 2 threads, a half panel
  check_w4a8(9, 33, 1024, 8, true, false);   // pre-packed: the smallest group it takes (one block)
  check_w4a8(300, 40, 1024, 64, true, true); // pre-packed: several row chunks
  check_w4a8(0, 5, 64, 32, true, true);
  check_w4a8(3, 0, 64, 32, true, true);
}

// ---------------------------------------------------------------------------
// Walsh-Hadamard transform checks
// ---------------------------------------------------------------------------
// rows x (m * p) values (row stride n + pad) in type t. With a +-1 matrix (or
// none) every SIMD tier must equal scalar bit for bit (same butterflies, and
// had * y + acc fused or not is the same when the product is exact); with a
// general fp32 matrix the tiers may differ by the FMA rounding: a tolerance.
// The scalar path is checked against a double-precision naive sum in the
// one-row cases (n <= 4096: O(n^2)).
void check_hadamard(int64_t rows, int64_t m, int64_t p, FloatType t, int had_kind, int64_t pad) {
  // had_kind: 0 none (m must be 1), 1 random +-1, 2 random uniform(-1, 1)
  const int64_t n = m * p, ldx = n + pad, es = t == FloatType::F32 ? 4 : 2;
  const size_t xe = static_cast<size_t>(rows > 0 ? (rows - 1) * ldx + n : 0);
  std::vector<uint8_t> x(xe * es);
  std::vector<float> xf(xe);
  fill_float(xf, -4.f, 4.f);
  std::uniform_int_distribution<int> bits(0, 1023), ex(10, 20), sign(0, 1);
  for (size_t i = 0; i < xe; ++i) {
    if (t == FloatType::F32) {
      std::memcpy(&x[i * 4], &xf[i], 4);
    } else {
      uint16_t h;
      if (t == FloatType::BF16) {
        h = llmeq::f32_to_bf16(xf[i]);
        xf[i] = llmeq::bf16_to_f32(h);
      } else {  // fp16 bit patterns of normal numbers in [2^-5, 2^6): the tiers are compared, not the values
        h = static_cast<uint16_t>(sign(g_rng) << 15 | ex(g_rng) << 10 | bits(g_rng));
      }
      std::memcpy(&x[i * 2], &h, 2);
    }
  }
  std::vector<float> had;
  if (had_kind == 1) {
    had.resize(m * m);
    for (auto& v : had) v = sign(g_rng) ? 1.0f : -1.0f;
  } else if (had_kind == 2) {
    had.resize(m * m);
    fill_float(had, -1.f, 1.f);
  }
  const float* hp = had.empty() ? nullptr : had.data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(n));
  char ctx[128];
  std::snprintf(ctx, sizeof ctx, "rows=%lld m=%lld p=%lld type=%d had=%d pad=%lld", (long long)rows, (long long)m,
                (long long)p, static_cast<int>(t), had_kind, (long long)pad);
  auto value = [&](const std::vector<uint16_t>& o, int64_t i) {
    if (t == FloatType::F32) {
      float v;
      std::memcpy(&v, reinterpret_cast<const char*>(o.data()) + i * 4, 4);
      return v;
    }
    return t == FloatType::BF16 ? llmeq::bf16_to_f32(o[i]) : 0.0f;
  };
  std::vector<uint16_t> scalar_out;
  for (Isa isa : all_isas()) {
    set_isa(isa);
    std::vector<uint16_t> out(static_cast<size_t>(rows * n * es / 2), 0xa5a5);
    hadamard_transform(x.data(), t, rows, n, ldx, hp, m, scale, out.data(), g_threads);
    if (isa == Isa::Scalar) {
      scalar_out = out;
      if (rows != 1 || n > 4096 || t == FloatType::F16) continue;
      for (int64_t j = 0; j < n; ++j) {  // against the naive double sum
        const int64_t a = j / p, b = j % p;
        double s = 0, mag = 0;
        for (int64_t c = 0; c < m; ++c) {
          const double h = hp ? hp[a * m + c] : 1.0;
          for (int64_t k = 0; k < p; ++k) {
            const bool neg = __builtin_popcountll(static_cast<unsigned long long>(b & k)) & 1;  // S_p[b, k]
            const double v = (neg ? -h : h) * xf[c * p + k];
            s += v;
            mag += std::fabs(v);
          }
        }
        s *= scale;
        mag *= scale;
        const int stages = __builtin_ctzll(static_cast<unsigned long long>(p));
        const double tol = 4.0 * (stages + m + 2) * 6e-8 * mag +
                           (t == FloatType::BF16 ? std::ldexp(std::fabs(s), -8) : 0.0);  // + bf16 rounding
        if (!(std::fabs(value(out, j) - s) <= tol)) {
          char b2[200];
          std::snprintf(b2, sizeof b2, "%s j=%lld got %g want %g", ctx, (long long)j, value(out, j), s);
          fail("scalar hadamard vs naive double", b2);
          break;
        }
      }
      continue;
    }
    if (had_kind != 2) {
      if (out != scalar_out) fail((std::string(isa_name(isa)) + " hadamard != scalar (bits)").c_str(), ctx);
      continue;
    }
    for (int64_t i = 0; i < rows * n; ++i) {  // general matrix: the fused rounding differs, slightly
      const float a = value(out, i), b = value(scalar_out, i);
      if (!(std::fabs(a - b) <= 1e-5f * (std::fabs(b) + 1.0f))) {
        char b2[200];
        std::snprintf(b2, sizeof b2, "%s i=%lld got %g scalar %g", ctx, (long long)i, a, b);
        fail((std::string(isa_name(isa)) + " hadamard vs scalar").c_str(), b2);
        break;
      }
    }
  }
}

void check_hadamard_all() {
  const int64_t mp[][2] = {{1, 1},  {1, 2},   {1, 4},   {1, 8},  {1, 16},  {1, 64},  {1, 4096}, {2, 8},
                           {3, 32}, {5, 8},   {12, 1},  {12, 4}, {12, 8},  {12, 16}, {12, 128}, {20, 128},
                           {36, 16}, {28, 512}, {7, 2}, {6, 64}};
  for (const auto& s : mp)
    for (FloatType t : {FloatType::F32, FloatType::BF16, FloatType::F16})
      for (int64_t rows : {1, 3, 40}) {
        if (rows == 40 && s[0] * s[1] > 2048) continue;
        const int64_t pad = rows == 3 ? 3 : 0;
        check_hadamard(rows, s[0], s[1], t, 1, pad);
        if (s[0] == 1) check_hadamard(rows, 1, s[1], t, 0, pad);
        if (t == FloatType::F32) check_hadamard(rows, s[0], s[1], t, 2, pad);
      }
  check_hadamard(0, 12, 8, FloatType::F32, 1, 0);
}

// The LLMEQ_CPU_ISA cap rules of cpu_kernels.h, for every name, on this CPU:
// a cap at or above the detected tier is the detected tier, a lower tier of
// its chain is that tier, the other chain's tiers cap to scalar, an unknown
// name is no cap.
void check_isa_cap() {
  // Written out independently of isa.cpp: the two chains, lowest first.
  const int lens[2] = {4, 3};
  const Isa chains[2][4] = {{Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Avx512Amx},
                            {Isa::Scalar, Isa::Neon, Isa::NeonDotprod, Isa::NeonDotprod}};
  const Isa best = detected_isa();
  for (int c = 0; c < 2; ++c)
    for (int i = 0; i < lens[c]; ++i) {
      const Isa cap = chains[c][i];
      Isa want = Isa::Scalar;  // other chain (or scalar itself)
      for (int b = 0; b < lens[c]; ++b)
        if (chains[c][b] == best && best != Isa::Scalar) want = chains[c][i < b ? i : b];
      setenv("LLMEQ_CPU_ISA", isa_name(cap), 1);
      if (active_isa() != want)
        fail("LLMEQ_CPU_ISA cap", std::string(isa_name(cap)) + " -> " + isa_name(active_isa()) +
                                      ", want " + isa_name(want));
    }
  setenv("LLMEQ_CPU_ISA", "no_such_tier", 1);
  if (active_isa() != best) fail("LLMEQ_CPU_ISA cap", "unknown name must be no cap");
}

void self_check() {
  check_isa_cap();
  std::string tiers;
  for (Isa i : simd_isas()) tiers += std::string(tiers.empty() ? "" : ", ") + isa_name(i);
  std::printf("== self-check (SIMD paths up to %s vs scalar, bit-exact): checking %s\n",
              isa_name(g_cap), tiers.empty() ? "no SIMD tier (scalar only)" : tiers.c_str());
  const int64_t Ms[] = {1, 2, 3, 4, 5, 6, 7, 9, 12, 16, 17, 18, 23, 53};
  const int64_t Ks[] = {1, 3, 4, 17, 63, 64, 65, 100, 4097};
  const int64_t Ns[] = {1, 5, 8, 17, 33, 64, 65, 130};
  for (int64_t M : Ms)
    for (int64_t K : Ks)
      for (int64_t N : Ns) check_int(M, N, K, (M + N + K) % 3 == 0 ? 5 : 0);
  // Zero-sized and K = 0 (acc = 0).
  check_int(0, 5, 7, 0);
  check_int(3, 0, 7, 0);
  check_int(3, 5, 0, 0);
  check_int(60, 70, 0, 1);
  // Extremes: |acc| close to 2^31 must not saturate anywhere (K = 65536 is the
  // documented limit: 255 * -128 * 65536 = -2139095040).
  check_int(7, 9, 4097, 3, 1);
  check_int(7, 9, 4097, 3, 2);
  check_int(2, 3, 65536, 0, 1, false);
  check_int(50, 3, 65536, 0, 1, false);
  // Larger shapes through the packed and dot paths, scalar-only reference.
  check_int(16, 2304, 768, 0, 0, false);
  check_int(130, 777, 515, 9, 0, false);
  check_int(200, 96, 4096, 0, 0, false);
  // Pre-packed: past one 384-row block (panel x row-block units), and column
  // ranges that start and end inside panels (N = 208: 13 vectors, 2 threads).
  check_int(400, 70, 100, 2, 0, false);
  check_int(9, 208, 300, 0, 0, false);
  check_int(777, 17, 33, 0, 0, false);
  // The AMX tile kernel (avx512_amx tier; pre-packed, K % 64 == 0, M >= 8):
  // rows ending inside a 32-row group (the zero-padded copy), columns ending
  // inside a 16- and a 32-column tile and a panel, K of one and several tile
  // rows, more than one row block (K = 64: 1024 rows) on both threads, and
  // the extremes of |acc| (K = 65536 above).
  for (int64_t M : {8, 9, 16, 17, 31, 32, 33, 70})
    for (int64_t K : {64, 192})
      for (int64_t N : {1, 17, 33, 64, 130}) check_int(M, N, K, (M + N) % 2 ? 3 : 0, 0, false);
  check_int(1100, 90, 64, 1, 0, false);
  check_int(45, 70, 4096, 0, 1, false);
  check_int(45, 70, 4096, 0, 2, false);
  for (int64_t M : {1, 3, 5, 16, 17, 48, 61})
    for (int64_t K : {1, 17, 63, 65, 100})
      for (int64_t N : {1, 5, 33, 70}) check_scaled(M, N, K, (M + K) % 2 ? 3 : 0);
  check_scaled(0, 4, 4, 0);
  check_scaled(3, 5, 0, 1);
  check_scaled(100, 200, 300, 2);
  check_scaled(20, 33, 2100, 1);  // dot kernel at 16 < M < 32 (large K)
  check_scaled(40, 70, 2100, 0);
  check_scaled(390, 81, 130, 1);
  check_scaled(16, 33, 64, 0);  // the AMX kernel's epilogue (K % 64 == 0, M >= 8)
  check_scaled(77, 100, 640, 3);
  for (int64_t N : {1, 5, 33, 100})
    for (int64_t K : {0, 1, 17, 63, 64, 65, 4097}) check_row_sums(N, K, K % 2 ? 3 : 0);
  for (int64_t M : {1, 2, 3, 4, 5, 8, 9, 16, 17, 33})
    for (int64_t NK : {0, 1, 2}) {
      const int64_t N = NK == 0 ? 1 : NK == 1 ? 7 : 53;
      for (int bits : {8, 4, 3, 2}) {
        check_wo(M, N, 1, bits, 1, true, true);
        check_wo(M, N, 17, bits, 17, NK != 1, NK != 2);
        check_wo(M, N, 100, bits, 100, true, false);
        check_wo(M, N, 256, bits, 32, true, true);
        check_wo(M, N, 384, bits, 128, false, true);
        check_wo(M, N, 96, bits, 24, true, true);  // group not a multiple of the vector chunk
      }
    }
  // K spanning several K blocks of the buffered (M >= 4) schedule.
  for (int64_t M : {1, 3, 4, 7, 13})
    for (int bits : {8, 4, 3, 2}) {
      check_wo(M, 11, 1101, bits, 1101, true, true);
      check_wo(M, 9, 1536, bits, 128, true, false);
      check_wo(M, 6, 2080, bits, 32, false, true);
    }
  // AVX2 tier: group sizes off the 8 / 16-value chunk grid (odd ones too),
  // straddling chunks, several K blocks and row tiles with remainders.
  for (int bits : {8, 4, 3, 2}) {
    for (int64_t M : {1, 2, 5, 6, 16, 33}) {
      check_wo(M, 13, 105, bits, 7, true, true);     // odd group size
      check_wo(M, 7, 130, bits, 10, bits != 3, true);
      check_wo(M, 5, 100, bits, 20, true, false);
      check_wo(M, 9, 1000, bits, 40, false, true);   // 40: multiple of 8, not of 16
      check_wo(M, 19, 1536, bits, 64, true, true);
      check_wo(M, 3, 999, bits, 333, true, true);    // odd K, odd group
    }
    check_wo(300, 37, 640, bits, 64, true, true);
    check_wo(130, 21, 4096, bits, 128, bits % 2 == 0, true);
  }
  check_wo(3, 5, 0, 8, 1, false, true);
  check_wo(6, 5, 0, 4, 1, true, true);
  check_wo(2, 5, 0, 3, 1, true, true);
  check_w4a8_all();
  check_hadamard_all();
  std::printf("   %s (%d failures)\n", g_failures ? "FAILED" : "ok", g_failures);
}

// ---------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------
struct Timing {
  double med, lo, hi;  // seconds
};

Timing time_it(const std::function<void(int)>& fn, int runs, int warmup = 2) {
  for (int i = 0; i < warmup; ++i) fn(i);
  std::vector<double> t(runs);
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn(warmup + i);
    t[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::sort(t.begin(), t.end());
  return {t[runs / 2], t.front(), t.back()};
}

// Runs needed: >= 20, more for fast calls (aim at ~0.3 s per measurement).
int runs_for(double est_seconds) {
  const int r = static_cast<int>(0.3 / std::max(est_seconds, 1e-7));
  return std::clamp(r, 20, g_quick ? 50 : 200);
}

struct Shape {
  const char* name;
  int64_t N, K;
};

const Shape kShapes[] = {{"llama q/o 4096x4096", 4096, 4096},
                         {"llama up 11008x4096", 11008, 4096},
                         {"llama down 4096x11008", 4096, 11008},
                         {"gpt2 qkv 2304x768", 2304, 768},
                         {"gpt2 fc 3072x768", 3072, 768},
                         {"gpt2 proj 768x3072", 768, 3072}};

// Enough weight copies that cycling through them evicts the 32 MiB L3.
int cold_copies(size_t bytes) {
  return static_cast<int>(std::max<size_t>(2, (96u << 20) / std::max<size_t>(bytes, 1) + 1));
}

void bench_gemm() {
  std::printf("\n== gemm_u8s8_scaled (fp32 out, a_corr + bias), threads=%d\n", g_threads);
  std::printf("%-22s %5s %-12s %10s %9s %-19s %s\n", "shape (N x K)", "M", "isa", "median ms",
              "GOP/s", "[min..max GOP/s]", "weights GB/s hot | cold");
  std::vector<int64_t> Ms = g_quick ? std::vector<int64_t>{1, 16, 2048}
                                    : std::vector<int64_t>{1, 16, 128, 2048};
  for (const Shape& s : kShapes) {
    if (g_quick && s.N == 11008) continue;
    const int64_t N = s.N, K = s.K;
    const size_t wbytes = static_cast<size_t>(N * K);
    const int copies = cold_copies(wbytes);
    std::vector<avec<int8_t>> Bs(copies, avec<int8_t>(wbytes));
    for (auto& b : Bs) fill_int(b, -128, 127);
    std::vector<float> b_scale(N), bias(N);
    std::vector<int32_t> b_sum(N);
    fill_float(b_scale, 1e-4f, 1e-2f);
    fill_float(bias, -1.f, 1.f);
    row_sums_s8(Bs[0].data(), N, K, K, b_sum.data(), g_threads);
    for (int64_t M : Ms) {
      avec<uint8_t> A(M * K);
      fill_int(A, 0, 255);
      std::vector<float> a_scale(M);
      avec<float> out(M * N);
      std::vector<int32_t> a_corr(M, 128);
      fill_float(a_scale, 1e-3f, 1e-2f);
      GemmEpilogue ep;
      ep.a_scale = a_scale.data();
      ep.a_corr = a_corr.data();
      ep.b_scale = b_scale.data();
      ep.b_sum = b_sum.data();
      ep.bias = bias.data();
      ep.out = out.data();
      ep.ldo = N;
      const double ops = 2.0 * M * N * K;
      for (Isa isa : timed_isas()) {
        // The scalar path is only a reference: time it where it is affordable.
        if (isa == Isa::Scalar && M > 16) continue;
        if ((isa == Isa::Avx2 || isa == Isa::Neon) && M * N * K > (int64_t(1) << 34) && g_quick)
          continue;
        set_isa(isa);
        auto hot = [&](int) {
          gemm_u8s8_scaled(M, N, K, A.data(), K, Bs[0].data(), K, ep, g_threads);
        };
        const auto t0 = std::chrono::steady_clock::now();
        hot(0);
        const double est = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const Timing th = time_it(hot, runs_for(est));
        char bw[64] = "";
        if (M <= 16) {
          auto cold = [&](int i) {
            gemm_u8s8_scaled(M, N, K, A.data(), K, Bs[i % copies].data(), K, ep, g_threads);
          };
          const Timing tc = time_it(cold, std::max(runs_for(est), 2 * copies), copies);
          std::snprintf(bw, sizeof bw, "%6.1f | %6.1f", wbytes / th.med / 1e9, wbytes / tc.med / 1e9);
        }
        std::printf("%-22s %5lld %-12s %10.3f %9.1f [%7.1f..%7.1f] %s\n", s.name, (long long)M,
                    isa_name(isa), th.med * 1e3, ops / th.med / 1e9, ops / th.hi / 1e9,
                    ops / th.lo / 1e9, bw);
        std::fflush(stdout);
        if (!has_prepacked_simd()) continue;
        // The same product from QLinear's pre-packed copy of the weights.
        std::vector<avec<int8_t>> Ps(copies, avec<int8_t>(static_cast<size_t>(
                                                  (N + kS8PanelCols - 1) / kS8PanelCols * s8_panel_bytes(K))));
        for (int i = 0; i < copies; ++i) pack_s8_panels(Bs[i].data(), N, K, K, Ps[i].data());
        auto phot = [&](int) {
          gemm_u8s8_prepacked_scaled(M, N, K, A.data(), K, Ps[0].data(), ep, g_threads);
        };
        const Timing tp = time_it(phot, runs_for(est));
        char pbw[64] = "";
        if (M <= 16) {
          auto pcold = [&](int i) {
            gemm_u8s8_prepacked_scaled(M, N, K, A.data(), K, Ps[i % copies].data(), ep, g_threads);
          };
          const Timing tc = time_it(pcold, std::max(runs_for(est), 2 * copies), copies);
          std::snprintf(pbw, sizeof pbw, "%6.1f | %6.1f", wbytes / tp.med / 1e9, wbytes / tc.med / 1e9);
        }
        std::printf("%-22s %5lld %-12s %10.3f %9.1f [%7.1f..%7.1f] %s\n", s.name, (long long)M,
                    "  +prepacked", tp.med * 1e3, ops / tp.med / 1e9, ops / tp.hi / 1e9, ops / tp.lo / 1e9, pbw);
        std::fflush(stdout);
      }
    }
  }
}

void bench_weight_only() {
  std::printf("\n== gemm_weight_only (fp32 x), threads=%d: GB/s on weight bytes (hot | cold)\n",
              g_threads);
  std::printf("%-22s %3s %-22s %-12s %10s %16s %9s\n", "shape (N x K)", "M", "weights", "isa",
              "median ms", "GB/s hot | cold", "GFLOP/s");
  for (const Shape& s : kShapes) {
    if (g_quick && s.N == 11008) continue;
    const int64_t N = s.N, K = s.K;
    for (int bits : {8, 4}) {
      const int64_t g = bits == 8 ? K : 128;
      const int64_t G = K / g;
      const size_t wbytes = static_cast<size_t>(N * (bits == 8 ? K : (K + 1) / 2));
      const int copies = cold_copies(wbytes);
      std::vector<avec<uint8_t>> Ws(copies, avec<uint8_t>(wbytes));
      for (auto& w : Ws) fill_int(w, 0, 255);
      std::vector<float> scale(N * G);
      std::vector<int8_t> zp(N * G);
      std::vector<float> bias(N);
      fill_float(scale, 1e-3f, 1e-2f);
      fill_int(zp, -3, 3);
      fill_float(bias, -1.f, 1.f);
      for (int64_t M : {1, 16, 128}) {
        avec<float> x(M * K), out(M * N);
        fill_float(x, -1.f, 1.f);
        for (Isa isa : timed_isas()) {
          if (isa == Isa::Scalar && M > 16) continue;
          set_isa(isa);
          auto call = [&](int i) {
            gemm_weight_only(M, N, K, x.data(), Ws[i % copies].data(), bits, g, scale.data(),
                             bits == 4 ? zp.data() : nullptr, bias.data(), out.data(), g_threads);
          };
          const auto t0 = std::chrono::steady_clock::now();
          call(0);
          const double est = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          const int runs = isa == Isa::Scalar ? 20 : runs_for(est);
          const Timing th = time_it([&](int) { call(0); }, runs);
          const Timing tc = time_it(call, std::max(runs, 2 * copies), copies);
          char wdesc[32];
          std::snprintf(wdesc, sizeof wdesc, bits == 8 ? "int8 per-channel" : "int4 g128 +zp");
          std::printf("%-22s %3lld %-22s %-12s %10.3f %7.1f | %6.1f %9.1f\n", s.name, (long long)M,
                      wdesc, isa_name(isa), th.med * 1e3, wbytes / th.med / 1e9,
                      wbytes / tc.med / 1e9, 2.0 * M * N * K / th.med / 1e9);
          std::fflush(stdout);
        }
      }
    }
  }
}

void bench_w4a8() {
  std::printf("\n== gemm_w4a8 (int8 a x int4 g128 +zp), threads=%d: GOP/s (2 x multiply-adds / s), GB/s on weight bytes\n",
              g_threads);
  std::printf("%-22s %4s %-12s %10s %9s %9s\n", "shape (N x K)", "M", "isa", "median ms", "GOP/s", "GB/s");
  for (const Shape& s : kShapes) {
    if (g_quick && s.N == 11008) continue;
    const int64_t N = s.N, K = s.K, g = 128, G = K / g;
    avec<uint8_t> W(N * K / 2);
    fill_int(W, 0, 255);
    std::vector<float> scale(N * G), bias(N);
    std::vector<int8_t> zp(N * G);
    fill_float(scale, 1e-3f, 1e-2f);
    fill_int(zp, -3, 3);
    fill_float(bias, -1.f, 1.f);
    for (int64_t M : {1, 16, 128, 512}) {
      avec<int8_t> a(M * K);
      avec<float> as(M), out(M * N);
      fill_int(a, -127, 127);
      fill_float(as, 1e-3f, 1e-2f);
      for (Isa isa : timed_isas()) {
        if (isa == Isa::Scalar && M > 16) continue;
        set_isa(isa);
        auto call = [&](int) {
          gemm_w4a8(M, N, K, a.data(), K, as.data(), W.data(), g, scale.data(), zp.data(), bias.data(),
                    out.data(), g_threads);
        };
        const auto t0 = std::chrono::steady_clock::now();
        call(0);
        const double est = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const Timing t = time_it(call, isa == Isa::Scalar ? 5 : runs_for(est));
        std::printf("%-22s %4lld %-12s %10.3f %9.1f %9.1f\n", s.name, (long long)M, isa_name(isa), t.med * 1e3,
                    2.0 * M * N * K / t.med / 1e9, N * K / 2 / t.med / 1e9);
        std::fflush(stdout);
        if (!has_prepacked_simd()) continue;
        // The same shapes from the pre-packed layout (random nibbles; group params as a layer has them).
        const int64_t P = (N + 15) / 16;
        avec<uint8_t> Wp(P * w4_panel_bytes(K));
        fill_int(Wp, 0, 255);
        std::vector<float> gp(P * G * 32);
        for (int64_t i = 0; i < P * G; ++i)
          for (int c = 0; c < 16; ++c) {
            gp[i * 32 + c] = scale[(i % G) + G * ((i / G * 16 + c) % N)];
            gp[i * 32 + 16 + c] = 8.0f + zp[(i % G) + G * ((i / G * 16 + c) % N)];
          }
        auto pcall = [&](int) {
          gemm_w4a8_prepacked(M, N, K, a.data(), K, as.data(), Wp.data(), gp.data(), g, bias.data(), out.data(),
                              g_threads);
        };
        const Timing tp = time_it(pcall, runs_for(est / 2));
        std::printf("%-22s %4lld %-12s %10.3f %9.1f %9.1f\n", s.name, (long long)M, "  +prepacked", tp.med * 1e3,
                    2.0 * M * N * K / tp.med / 1e9, N * K / 2 / tp.med / 1e9);
        std::fflush(stdout);
      }
    }
  }
}

void bench_quantize() {
#ifdef LLMEQ_BENCH_NO_QUANTIZE
  std::printf("\n== quantize_dynamic: skipped (built with LLMEQ_BENCH_NO_QUANTIZE)\n");
#else
  std::printf("\n== quantize_dynamic (fp32 [M,K] -> int8, per-row symmetric), threads=%d\n",
              g_threads);
  std::printf("%5s %6s %-12s %10s %12s\n", "M", "K", "isa", "median us", "GB/s (input)");
  for (int64_t K : {4096, 11008}) {
    for (int64_t M : {1, 16, 128, 2048}) {
      avec<float> x(M * K);
      fill_float(x, -3.f, 3.f);
      avec<int8_t> q(M * K);
      std::vector<float> scale(M);
      std::vector<int8_t> zp(M);
      for (Isa isa : timed_isas()) {
        set_isa(isa);
        auto call = [&](int) {
          quantize_dynamic(x.data(), FloatType::F32, M, K, K, 8, true, K, q.data(), scale.data(),
                           zp.data(), g_threads);
        };
        const auto t0 = std::chrono::steady_clock::now();
        call(0);
        const double est = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const Timing t = time_it(call, runs_for(est));
        std::printf("%5lld %6lld %-12s %10.1f %12.1f\n", (long long)M, (long long)K, isa_name(isa),
                    t.med * 1e6, M * K * 4.0 / t.med / 1e9);
        std::fflush(stdout);
      }
    }
  }
#endif
}

}  // namespace

// ---------------------------------------------------------------------------
// Instruction-mix peaks (peak_avx2.cpp, peak_amx.cpp): the ceilings the GEMM
// timings are read against
// ---------------------------------------------------------------------------
#if defined(LLMEQ_PEAK_AVX2)
namespace peak {
double exact_int8_macs_per_s(long reps);
double maddubs_int8_macs_per_s(long reps);
double fp32_fma_macs_per_s(long reps);
double vnni_int8_macs_per_s(long reps);  // each tier's functions run only where it was detected
double amx_int8_macs_per_s(long reps);
}  // namespace peak

struct PeakRow {
  const char* name;
  double (*fn)(long);  // multiply-adds per second on the calling thread
};

// Each row: the best of 5 runs of fn on every thread at once, summed.
void print_peaks(const char* title, const std::vector<PeakRow>& rows, long reps) {
  std::printf("\n== %s, GOP/s (2 x multiply-adds / s; best of 5), threads=%d\n", title, g_threads);
  for (const PeakRow& r : rows) {
    double best = 0;
    for (int t = 0; t < 5; ++t) {
      double sum = 0;
#pragma omp parallel num_threads(g_threads) reduction(+ : sum)
      sum += r.fn(reps);
      best = std::max(best, sum);
    }
    std::printf("  %-78s %8.1f\n", r.name, 2 * best / 1e9);
  }
}

void bench_peak() {
  const Isa isa = detected_isa();
  if (isa == Isa::Scalar) {
    std::printf("\n== peaks: this CPU has no AVX2; nothing to measure\n");
    return;
  }
  print_peaks("AVX2 instruction-mix peaks",
              {{"exact int8: 12 vpmaddwd + 12 vpaddd + 6 vpbroadcastd / 192 (our AVX2 GEMM)",
                peak::exact_int8_macs_per_s},
               {"7-bit int8: vpmaddubsw + vpmaddwd + vpaddd / 32 (fbgemm, reduce_range)", peak::maddubs_int8_macs_per_s},
               {"fp32: vfmadd231ps / 8 (BLAS)", peak::fp32_fma_macs_per_s}},
              g_quick ? 20000 : 60000);
  if (!has_avx512(isa)) return;
  std::vector<PeakRow> rows{{"vpdpbusd: 12 zmm chains (avx512_vnni int8 GEMM)", peak::vnni_int8_macs_per_s}};
  if (isa == Isa::Avx512Amx)
    rows.push_back({"tdpbusd: 4 C tiles of 16x16, resident A/B (avx512_amx int8 GEMM)", peak::amx_int8_macs_per_s});
  print_peaks("AVX-512 tier peaks", rows, g_quick ? 200000 : 1000000);
}
#else
void bench_peak() { std::printf("\n== peaks: measured on x86-64 only\n"); }
#endif

int main(int argc, char** argv) {
  bool check_only = false;
  std::string only;  // gemm | wo | w4a8 | quant | peak
  std::string expect_isa;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) {
      g_threads = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--quick")) {
      g_quick = true;
    } else if (!std::strcmp(argv[i], "--check-only")) {
      check_only = true;
    } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      only = argv[++i];
    } else if (!std::strcmp(argv[i], "--isa") && i + 1 < argc) {
      g_time_isa = argv[++i];
    } else if (!std::strcmp(argv[i], "--expect-isa") && i + 1 < argc) {
      expect_isa = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--quick] [--check-only] [--only gemm|wo|w4a8|quant|peak]\n"
                   "       [--isa scalar|avx2|avx512_vnni|avx512_amx|neon|neon_dotprod] [--expect-isa NAME]\n", argv[0]);
      return 2;
    }
  }
  const char* env = std::getenv("LLMEQ_CPU_ISA");
  const std::string env_isa = env ? env : "";
  g_cap = active_isa();
  std::printf("bench_kernels: threads=%d, detected ISA %s, active %s, OMP_WAIT_POLICY=%s\n",
              g_threads, isa_name(detected_isa()), isa_name(g_cap), std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "(unset)");
  if (!expect_isa.empty() && expect_isa != isa_name(g_cap)) {
    std::printf("EXPECTED ISA %s, but the tier in use is %s: not checked\n", expect_isa.c_str(),
                isa_name(g_cap));
    return 2;
  }
  self_check();
  if (!check_only) {
    if (only.empty() || only == "gemm") bench_gemm();
    if (only.empty() || only == "wo") bench_weight_only();
    if (only.empty() || only == "w4a8") bench_w4a8();
    if (only.empty() || only == "quant") bench_quantize();
    if (only.empty() || only == "peak") {
      bench_peak();
    }
  }
  if (env) setenv("LLMEQ_CPU_ISA", env_isa.c_str(), 1); else unsetenv("LLMEQ_CPU_ISA");
  if (g_failures) {
    std::printf("\nSELF-CHECK FAILED: %d failure(s)\n", g_failures);
    return 1;
  }
  return 0;
}
