// CPU implementations of the ops defined in schema.cpp: argument checks, then
// the torch-free kernels of src/cpp/kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "op_checks.h"
#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"

namespace llmeq {
namespace {

int nthreads() { return at::get_num_threads(); }

const at::Device kCpu(at::kCPU);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t bits, bool symmetric,
                                                            int64_t group_size) {
  const char* op = "llmeasyquant.quantize";
  check_quant_input(op, x, bits, group_size, kCpu);
  if (group_size == 0)
    TORCH_CHECK_VALUE(x.numel() > 0, msg(op, ": per-tensor quantization of an empty tensor ", shape_str(x)));
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  const int64_t rows = xv.size(0);
  at::Tensor q = q_storage(x.sizes(), bits, x.options());
  at::Tensor scale = at::empty(scale_shape(x.sizes(), group_size), x.options().dtype(at::kFloat));
  at::Tensor zp = at::empty(scale.sizes(), x.options().dtype(at::kChar));
  if (K == 0) {  // no values: per row the empty-range scale, group-wise no groups
    float s;
    int8_t z;
    empty_range_scale(static_cast<int>(bits), symmetric, &s, &z);
    scale.fill_(s);
    zp.fill_(z);
    return {q, scale, zp};
  }
  if (group_size == 0) {
    float r[3];
    cpu::tensor_minmax(xv.data_ptr(), float_type(x.scalar_type()), rows, K, xv.stride(0), r, nthreads());
    float s;
    int8_t z = 0;
    if (symmetric)
      s = scale_from_absmax(r[0], static_cast<int>(bits));
    else
      scale_zp_from_minmax(r[1], r[2], static_cast<int>(bits), &s, &z);
    scale.fill_(s);
    zp.fill_(z);
    cpu::quantize_with_scale(xv.data_ptr(), float_type(x.scalar_type()), rows, K, xv.stride(0), bits, K,
                             scale.data_ptr<float>(), zp.data_ptr<int8_t>(), 0, q.data_ptr(), nthreads());
  } else {
    cpu::quantize_dynamic(xv.data_ptr(), float_type(x.scalar_type()), rows, K, xv.stride(0), bits, symmetric,
                          group_len(group_size, K), q.data_ptr(), scale.data_ptr<float>(), zp.data_ptr<int8_t>(),
                          nthreads());
  }
  return {q, scale, zp};
}

// Shapes and dtypes (checks.h), plus the values: scales finite and > 0,
// 4-bit zero-points in range.
int64_t check_scales(const char* op, at::IntArrayRef xs, const at::Tensor& scale, const at::Tensor& zp, int64_t bits,
                     int64_t group_size, bool check_values) {
  check_device(op, "scale", scale, kCpu);
  check_device(op, "zero_point", zp, kCpu);
  const int64_t sstride = check_scale_shapes(op, xs, scale, zp, group_size);
  if (check_values) check_scale_values(op, scale, zp, bits);
  return sstride;
}

at::Tensor quantize_static_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zp, int64_t bits,
                               int64_t group_size) {
  const char* op = "llmeasyquant.quantize_static";
  check_quant_input(op, x, bits, group_size, kCpu);
  const int64_t sstride = check_scales(op, x.sizes(), scale, zp, bits, group_size, true);
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  at::Tensor q = q_storage(x.sizes(), bits, x.options());
  if (q.numel() == 0) return q;
  const at::Tensor s = scale.contiguous(), z = zp.contiguous();
  cpu::quantize_with_scale(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), K, xv.stride(0), bits,
                           group_len(group_size, K), s.data_ptr<float>(), z.data_ptr<int8_t>(), sstride,
                           q.data_ptr(), nthreads());
  return q;
}

at::Tensor dequantize_cpu(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp, int64_t bits,
                          int64_t group_size, int64_t K, at::ScalarType dtype) {
  const char* op = "llmeasyquant.dequantize";
  const std::vector<int64_t> xs = check_dequantize_args(op, q, bits, group_size, K, dtype, kCpu);
  const int64_t sstride = check_scales(op, xs, scale, zp, bits, group_size, false);
  const at::Tensor qc = q.contiguous(), s = scale.contiguous(), z = zp.contiguous();
  at::Tensor out = at::empty(xs, q.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / K;
  cpu::dequantize(qc.data_ptr(), rows, K, bits, group_len(group_size, K), s.data_ptr<float>(), z.data_ptr<int8_t>(),
                  sstride, out.data_ptr(), float_type(dtype), nthreads());
  return out;
}

void channel_stats_cpu(const at::Tensor& x, at::Tensor& absmax, at::Tensor& mn, at::Tensor& mx) {
  const char* op = "llmeasyquant.channel_stats_";
  check_channel_stats_args(op, x, absmax, mn, mx, kCpu);
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  cpu::channel_stats_update(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), K, xv.stride(0),
                            absmax.data_ptr<float>(), mn.data_ptr<float>(), mx.data_ptr<float>(), nthreads());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ema_quantize_cpu(const at::Tensor& x, at::Tensor& state, double alpha,
                                                                double eps, int64_t bits, bool symmetric,
                                                                bool update) {
  const char* op = "llmeasyquant.ema_quantize_";
  check_ema_args(op, x, state, alpha, eps, bits, kCpu);
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  float* st = state.data_ptr<float>();
  const float e = static_cast<float>(eps);
  float src[3] = {st[0], st[1], st[2]};
  if (update) {  // quant_math.h ema_step: non-finite observations are skipped
    float r[3] = {0.0f, 0.0f, 0.0f};
    if (x.numel()) cpu::tensor_minmax(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), K, xv.stride(0), r,
                                      nthreads());
    ema_step(st, r, static_cast<float>(alpha), static_cast<float>(1.0 - alpha), e, src);
  }
  float s;
  int8_t z = 0;
  if (symmetric) {
    s = scale_from_absmax(src[0], static_cast<int>(bits));
  } else {
    const float hi = nan_max(src[2], src[1] + e);
    scale_zp_from_minmax(src[1], hi, static_cast<int>(bits), &s, &z);
  }
  at::Tensor scale = at::full({1}, s, x.options().dtype(at::kFloat));
  at::Tensor zp = at::full({1}, z, x.options().dtype(at::kChar));
  at::Tensor q = q_storage(x.sizes(), bits, x.options());
  if (x.numel())
    cpu::quantize_with_scale(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), K, xv.stride(0), bits, K, &s, &z,
                             0, q.data_ptr(), nthreads());
  return {q, scale, zp};
}

// ---- GEMM -----------------------------------------------------------------
// vpdpbusd multiplies unsigned by signed bytes: A is shifted to u8 = a + 128
// (a XOR 0x80) and 128 * sum_k B[n,k] is subtracted again, exactly, in int32.
at::Tensor to_u8(const at::Tensor& a) {
  const at::Tensor ac = a.contiguous();
  at::Tensor u = at::empty(ac.sizes(), ac.options().dtype(at::kByte));
  const int8_t* s = ac.data_ptr<int8_t>();
  uint8_t* d = u.data_ptr<uint8_t>();
  const int64_t n = ac.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) d[i] = static_cast<uint8_t>(s[i]) ^ 0x80u;
  });
  return u;
}

at::Tensor row_sums(const at::Tensor& b) {
  const at::Tensor bc = b.contiguous();
  at::Tensor out = at::empty({bc.size(0)}, bc.options().dtype(at::kInt));
  cpu::row_sums_s8(bc.data_ptr<int8_t>(), bc.size(0), bc.size(1), bc.size(1), out.data_ptr<int32_t>(), nthreads());
  return out;
}

at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "llmeasyquant.int8_gemm";
  check_gemm_operands(op, a, b, kCpu);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  const at::Tensor au = to_u8(a), bc = b.contiguous();
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
  cpu::gemm_u8s8s32(M, N, K, au.data_ptr<uint8_t>(), K, bc.data_ptr<int8_t>(), K, c.data_ptr<int32_t>(), N,
                    nthreads());
  if (M && N) c.sub_(row_sums(bc).mul_(128).unsqueeze(0));
  return c;
}

at::Tensor scaled_int8_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const c10::optional<at::Tensor>& a_zero,
                                const at::Tensor& b, const at::Tensor& b_scale, const c10::optional<at::Tensor>& b_sum,
                                const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const char* op = "llmeasyquant.scaled_int8_gemm";
  check_gemm_operands(op, a, b, kCpu);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  check_scaled_gemm_args(op, M, N, a_scale, a_zero, b_scale, b_sum, out_dtype, kCpu);
  const at::Tensor corr = a_zero.has_value() ? a_zero->to(at::kInt).add_(128).contiguous()
                                             : at::full({1}, 128, a.options().dtype(at::kInt));
  // b_sum is the caller's cache of sum_k b[n, k] (QLinear.w_sum), trusted
  // here for the +128 offset as well as the zero-point correction: it must
  // be exact (the reference verifies it; checking it here would cost the very
  // pass over b it saves). Conventions in docs/architecture.md.
  const at::Tensor bsum = b_sum.has_value() ? b_sum->contiguous() : row_sums(b);
  const at::Tensor bias32 = bias_f32(op, bias, N, kCpu);
  const at::Tensor au = to_u8(a), bc = b.contiguous(), as = a_scale.contiguous(), bs = b_scale.contiguous();
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  cpu::GemmEpilogue ep;
  ep.a_scale = as.data_ptr<float>();
  ep.a_scale_stride = as.numel() == 1 ? 0 : 1;
  ep.a_corr = corr.data_ptr<int32_t>();
  ep.a_corr_stride = corr.numel() == 1 ? 0 : 1;
  ep.b_scale = bs.data_ptr<float>();
  ep.b_sum = bsum.data_ptr<int32_t>();
  ep.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.out_type = float_type(out_dtype);
  cpu::gemm_u8s8_scaled(M, N, K, au.data_ptr<uint8_t>(), K, bc.data_ptr<int8_t>(), K, ep, nthreads());
  return out;
}

// Per-token quantization of x, then the int8 product with the fused epilogue
// through `gemm` (row-major or pre-packed weights: the same numbers).
template <typename Gemm>
at::Tensor dynamic_linear(const at::Tensor& x, int64_t N, const at::Tensor& w_scale, const at::Tensor& w_sum,
                          const at::Tensor& bias32, bool act_symmetric, const Gemm& gemm) {
  const at::Tensor xv = rows_view(x);
  const int64_t M = xv.size(0), K = x.size(-1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor qa = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor as = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor corr = at::empty({M}, x.options().dtype(at::kInt));
  cpu::quantize_rows_u8(xv.data_ptr(), float_type(x.scalar_type()), M, K, xv.stride(0), act_symmetric,
                        qa.data_ptr<uint8_t>(), K, as.data_ptr<float>(), corr.data_ptr<int32_t>(), nthreads());
  const at::Tensor ws = w_scale.contiguous(), wsum = w_sum.contiguous();
  cpu::GemmEpilogue ep;
  ep.a_scale = as.data_ptr<float>();
  ep.a_corr = corr.data_ptr<int32_t>();
  ep.b_scale = ws.data_ptr<float>();
  ep.b_sum = wsum.data_ptr<int32_t>();
  ep.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.out_type = float_type(x.scalar_type());
  gemm(M, K, qa.data_ptr<uint8_t>(), ep);
  return out;
}

at::Tensor dynamic_quant_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                    const at::Tensor& w_sum, const c10::optional<at::Tensor>& bias,
                                    bool act_symmetric) {
  const char* op = "llmeasyquant.dynamic_quant_linear";
  check_dynamic_linear_args(op, x, w, w_scale, w_sum, kCpu);
  const int64_t N = w.size(0);
  const at::Tensor wc = w.contiguous();
  return dynamic_linear(x, N, w_scale, w_sum, bias_f32(op, bias, N, kCpu), act_symmetric,
                        [&](int64_t M, int64_t K, const uint8_t* qa, const cpu::GemmEpilogue& ep) {
                          cpu::gemm_u8s8_scaled(M, N, K, qa, K, wc.data_ptr<int8_t>(), K, ep, nthreads());
                        });
}

at::Tensor dynamic_quant_linear_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                           const at::Tensor& w_sum, int64_t in_features, int64_t out_features,
                                           const c10::optional<at::Tensor>& bias, bool act_symmetric) {
  const char* op = "llmeasyquant.dynamic_quant_linear_packed";
  check_dynamic_linear_packed_args(op, x, w_packed, w_scale, w_sum, in_features, out_features, kCpu);
  const int64_t N = out_features;
  const at::Tensor wp = w_packed.contiguous();
  return dynamic_linear(x, N, w_scale, w_sum, bias_f32(op, bias, N, kCpu), act_symmetric,
                        [&](int64_t M, int64_t K, const uint8_t* qa, const cpu::GemmEpilogue& ep) {
                          cpu::gemm_u8s8_prepacked_scaled(M, N, K, qa, K, wp.data_ptr<int8_t>(), ep, nthreads());
                        });
}

// Up to this many tokens the fused dequantize-in-registers kernel beats fp32
// BLAS (it streams 1- or 1/2-byte weights and runs near FMA peak); above it,
// dequantizing blocks of weight rows and calling BLAS is faster. Where the two
// cross depends on the kernel tier (benchmarks/bench_weight_only_cpu.py
// --crossover, docs/benchmarks.md):
//  * AVX-512: 4096x4096, 2 threads: direct/fp32 = 1.16x (8-bit) at M=512 and
//    1.08x (4-bit) at M=128, 0.4x at M=2048.
//  * AVX2 (Zen 3, 1 thread): 8-bit direct 0.95-1.02x at M=128 but 0.90-0.95x
//    at 256 where dequantize+BLAS gives 0.93-0.97x; 4-bit direct 0.86-0.95x at
//    256 vs 0.77-0.84x for dequantize+BLAS.
//  * scalar and the Arm tiers: not measured; the AVX-512 values stand.
int64_t weight_only_direct_max_m(int64_t bits) {
  if (cpu::active_isa() == cpu::Isa::Avx2) return bits == 8 ? 128 : 256;
  return bits == 8 ? 512 : 256;
}
constexpr int64_t kWeightOnlyBlockN = 256;

// The weight zero-points as given, or zeros shaped like the scales (symmetric).
at::Tensor zero_points_or_zeros(const c10::optional<at::Tensor>& zero_point, const at::Tensor& scale) {
  return zero_point.has_value() ? *zero_point : at::zeros(scale.sizes(), scale.options().dtype(at::kChar));
}

// No products (K, M or N = 0): the bias (or 0) in every row, as the fp32 epilogue would give.
at::Tensor bias_rows(int64_t M, int64_t N, const at::Tensor& bias32, const at::TensorOptions& f32) {
  at::Tensor out = at::zeros({M, N}, f32);
  if (bias32.defined()) out.add_(bias32.unsqueeze(0));
  return out;
}

at::Tensor weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale,
                                  const c10::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
                                  const c10::optional<at::Tensor>& bias) {
  const char* op = "llmeasyquant.weight_only_linear";
  check_weight_only_args(op, x, qw, bits, group_size, kCpu);
  const int64_t K = x.size(-1);
  const int64_t N = qw.size(0);
  const int64_t g = group_len(group_size, K);
  const at::Tensor zp = zero_points_or_zeros(zero_point, scale);
  check_scales(op, {N, K}, scale, zp, bits, group_size, false);
  const at::Tensor bias32 = bias_f32(op, bias, N, kCpu);
  const at::Tensor xf = rows_view(x.to(at::kFloat)).contiguous();
  const int64_t M = xf.size(0);
  const at::Tensor qc = qw.contiguous(), sc = scale.contiguous(), zc = zp.contiguous();
  at::Tensor out;
  if (K == 0 || M == 0 || N == 0) {
    out = bias_rows(M, N, bias32, xf.options());
  } else if (M <= weight_only_direct_max_m(bits)) {
    out = at::empty({M, N}, xf.options());
    cpu::gemm_weight_only(M, N, K, xf.data_ptr<float>(), qc.data_ptr(), bits, g, sc.data_ptr<float>(),
                          zero_point.has_value() ? zc.data_ptr<int8_t>() : nullptr,
                          bias32.defined() ? bias32.data_ptr<float>() : nullptr, out.data_ptr<float>(), nthreads());
  } else {
    out = at::empty({M, N}, xf.options());
    const int64_t G = K / g;
    const int64_t kb = packed_row_bytes(K, static_cast<int>(bits));
    at::Tensor wbuf = at::empty({std::min(N, kWeightOnlyBlockN), K}, xf.options());
    for (int64_t n0 = 0; n0 < N; n0 += kWeightOnlyBlockN) {
      const int64_t nb = std::min(kWeightOnlyBlockN, N - n0);
      at::Tensor wb = wbuf.narrow(0, 0, nb);
      cpu::dequantize(static_cast<const uint8_t*>(qc.data_ptr()) + n0 * kb, nb, K, bits, g,
                      sc.data_ptr<float>() + n0 * G, zc.data_ptr<int8_t>() + n0 * G, G, wb.data_ptr(),
                      cpu::FloatType::F32, nthreads());
      at::Tensor o = out.narrow(1, n0, nb);
      if (bias32.defined())
        at::addmm_out(o, bias32.narrow(0, n0, nb), xf, wb.t());
      else
        at::mm_out(o, xf, wb.t());
    }
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return shaped_result(out.to(x.scalar_type()), out_shape);
}

// Per-token symmetric int8 quantization of x, then the W4A8 product through
// `gemm` (canonical or pre-packed weights: the same numbers), x's dtype out.
template <typename Gemm>
at::Tensor w4a8_linear(const at::Tensor& x, int64_t N, const at::Tensor& bias32, const Gemm& gemm) {
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  const int64_t M = xv.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out;
  if (K == 0 || M == 0 || N == 0) {
    out = bias_rows(M, N, bias32, x.options().dtype(at::kFloat));
  } else {
    at::Tensor qa = at::empty({M, K}, x.options().dtype(at::kChar));
    at::Tensor as = at::empty({M}, x.options().dtype(at::kFloat));
    at::Tensor za = at::empty({M}, x.options().dtype(at::kChar));
    cpu::quantize_dynamic(xv.data_ptr(), float_type(x.scalar_type()), M, K, xv.stride(0), 8, true, K,
                          qa.data_ptr(), as.data_ptr<float>(), za.data_ptr<int8_t>(), nthreads());
    out = at::empty({M, N}, x.options().dtype(at::kFloat));
    gemm(M, K, qa.data_ptr<int8_t>(), as.data_ptr<float>(), bias32.defined() ? bias32.data_ptr<float>() : nullptr,
         out.data_ptr<float>());
  }
  return shaped_result(out.to(x.scalar_type()), out_shape);
}

at::Tensor w4a8_linear_cpu(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& w_zero, int64_t group_size,
                           const c10::optional<at::Tensor>& bias) {
  const char* op = "llmeasyquant.w4a8_linear";
  check_w4a8_args(op, x, qw, group_size, kCpu);
  const int64_t K = x.size(-1);
  const int64_t N = qw.size(0);
  const at::Tensor zp = zero_points_or_zeros(w_zero, w_scale);
  check_scales(op, {N, K}, w_scale, zp, 4, group_size, false);
  const at::Tensor qc = qw.contiguous(), sc = w_scale.contiguous(), zc = zp.contiguous();
  return w4a8_linear(x, N, bias_f32(op, bias, N, kCpu),
                     [&](int64_t M, int64_t K_, const int8_t* qa, const float* as, const float* b, float* out) {
                       cpu::gemm_w4a8(M, N, K_, qa, K_, as, qc.data_ptr<uint8_t>(), group_len(group_size, K_),
                                      sc.data_ptr<float>(), w_zero.has_value() ? zc.data_ptr<int8_t>() : nullptr, b,
                                      out, nthreads());
                     });
}

at::Tensor w4a8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& gparams,
                                  int64_t in_features, int64_t out_features, int64_t group_size,
                                  const c10::optional<at::Tensor>& bias) {
  const char* op = "llmeasyquant.w4a8_linear_packed";
  check_w4a8_packed_args(op, x, w_packed, gparams, in_features, out_features, group_size, kCpu);
  const int64_t N = out_features;
  const at::Tensor wp = w_packed.contiguous(), gp = gparams.contiguous();
  return w4a8_linear(x, N, bias_f32(op, bias, N, kCpu),
                     [&](int64_t M, int64_t K, const int8_t* qa, const float* as, const float* b, float* out) {
                       cpu::gemm_w4a8_prepacked(M, N, K, qa, K, as, wp.data_ptr<uint8_t>(), gp.data_ptr<float>(),
                                                group_len(group_size, K), b, out, nthreads());
                     });
}

at::Tensor hadamard_transform_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& had_m, double scale) {
  const char* op = "llmeasyquant.hadamard_transform";
  const int64_t m = check_hadamard_args(op, x, had_m, kCpu);
  const int64_t n = x.size(-1);
  const at::Tensor xv = rows_view(x);
  const at::Tensor h = had_m.has_value() ? had_m->contiguous() : at::Tensor();
  at::Tensor out = at::empty({xv.size(0), n}, x.options());
  cpu::hadamard_transform(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), n, xv.stride(0),
                          h.defined() ? h.data_ptr<float>() : nullptr, m, static_cast<float>(scale), out.data_ptr(),
                          nthreads());
  return shaped_result(out, x.sizes());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                    const at::Tensor& weight, double eps) {
  const char* op = "llmeasyquant.add_rms_norm";
  check_add_rms_norm_args(op, x, residual, weight, eps, kCpu);
  const int64_t n = x.size(-1);
  const at::Tensor xv = rows_view(x);
  const at::Tensor rv = residual.has_value() ? rows_view(*residual) : at::Tensor();
  const at::Tensor w = weight.contiguous();
  at::Tensor sum = at::empty(x.sizes(), x.options()), norm = at::empty(x.sizes(), x.options());
  cpu::add_rms_norm(xv.data_ptr(), rv.defined() ? rv.data_ptr() : nullptr, float_type(x.scalar_type()), xv.size(0),
                    n, xv.stride(0), rv.defined() ? rv.stride(0) : 0, w.data_ptr(), static_cast<float>(eps),
                    sum.data_ptr(), norm.data_ptr(), nthreads());
  return {norm, sum};
}

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "llmeasyquant.silu_mul";
  check_silu_mul_args(op, gate, up, kCpu);
  const at::Tensor gv = rows_view(gate), uv = rows_view(up);
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  cpu::silu_mul(gv.data_ptr(), uv.data_ptr(), float_type(gate.scalar_type()), gv.size(0), gv.size(1), gv.stride(0),
                uv.stride(0), out.data_ptr(), nthreads());
  return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin, int64_t pos,
                                double scale) {
  const char* op = "llmeasyquant.decode_attention_";
  check_decode_attention_args(op, q, k, v, k_cache, v_cache, cos, sin, pos, kCpu);
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const at::Tensor qv = rows_view(q), kv = rows_view(k), vv = rows_view(v);
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  cpu::decode_attention(qv.data_ptr(), kv.data_ptr(), vv.data_ptr(), float_type(q.scalar_type()), B, q.size(1) / D,
                        Hkv, D, qv.stride(0), kv.stride(0), vv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), S,
                        pos, c.data_ptr<float>(), s.data_ptr<float>(), static_cast<float>(scale), out.data_ptr(),
                        nthreads());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmeasyquant, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("quantize_static", &quantize_static_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("channel_stats_", &channel_stats_cpu);
  m.impl("ema_quantize_", &ema_quantize_cpu);
  m.impl("int8_gemm", &int8_gemm_cpu);
  m.impl("scaled_int8_gemm", &scaled_int8_gemm_cpu);
  m.impl("dynamic_quant_linear", &dynamic_quant_linear_cpu);
  m.impl("dynamic_quant_linear_packed", &dynamic_quant_linear_packed_cpu);
  m.impl("weight_only_linear", &weight_only_linear_cpu);
  m.impl("w4a8_linear", &w4a8_linear_cpu);
  m.impl("w4a8_linear_packed", &w4a8_linear_packed_cpu);
  m.impl("hadamard_transform", &hadamard_transform_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("decode_attention_", &decode_attention_cpu);
}

}  // namespace llmeq
