// CUDA implementations of the ops defined in src/cpp/torch/schema.cpp:
// argument checks (shared with the CPU side through checks.h), then the
// torch-free kernels of src/cuda/*.cu on the current stream. No op
// synchronises with the host except quantize_static's scale-value check,
// which is skipped while a CUDA graph is being captured.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "op_checks.h"
#include "llmeq/cuda_kernels.h"

namespace llmeq {
namespace {

void check_cuda_ok(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, msg(op, ": CUDA kernel launch failed: ", cudaGetErrorString(e)));
}

// The CUDA kernels run where the first tensor argument lives; every other
// tensor must be there too (op_checks.h). The dispatcher picks CUDA when any
// argument is on CUDA, so a CPU first argument means mixed devices.
at::Device cuda_device(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), msg(op, ": expected every tensor on one device: ", name, " is on ", t.device(),
                               ", another argument on CUDA"));
  return t.device();
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }
int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

bool capturing() {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream(), &st) == cudaSuccess && st != cudaStreamCaptureStatusNone;
}

// Tensor-wide absmax/min/max into scale/zero-point (per-tensor quantization).
void tensor_scale(const char* op, const at::Tensor& xv, int64_t bits, bool symmetric, at::Tensor& scale,
                  at::Tensor& zp) {
  const int blocks = cuda::minmax_blocks(xv.numel());
  at::Tensor partial = at::empty({blocks * 3}, xv.options().dtype(at::kFloat));
  check_cuda_ok(op, cuda::tensor_minmax_partial(xv.data_ptr(), float_type(xv.scalar_type()), xv.size(0), xv.size(1),
                                                xv.stride(0), partial.data_ptr<float>(), blocks, stream()));
  check_cuda_ok(op, cuda::finalize_tensor_scale(partial.data_ptr<float>(), blocks, static_cast<int>(bits), symmetric,
                                                scale.data_ptr<float>(), zp.data_ptr<int8_t>(), stream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, int64_t bits, bool symmetric,
                                                             int64_t group_size) {
  const char* op = "llmeasyquant.quantize";
  check_quant_input(op, x, bits, group_size, cuda_device(op, x, "x"));
  if (group_size == 0)
    TORCH_CHECK_VALUE(x.numel() > 0, msg(op, ": per-tensor quantization of an empty tensor ", shape_str(x)));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  const int64_t rows = xv.size(0);
  const auto t = float_type(x.scalar_type());
  at::Tensor q = q_storage(x.sizes(), bits, x.options());
  at::Tensor scale = at::empty(scale_shape(x.sizes(), group_size), x.options().dtype(at::kFloat));
  at::Tensor zp = at::empty(scale.sizes(), x.options().dtype(at::kChar));
  const int b = static_cast<int>(bits);
  if (K == 0) {  // no values: per row the empty-range scale (as on the CPU), group-wise no groups
    float s;
    int8_t z;
    empty_range_scale(b, symmetric, &s, &z);
    scale.fill_(s);
    zp.fill_(z);
    return {q, scale, zp};
  }
  if (group_size == 0) {
    tensor_scale(op, xv, bits, symmetric, scale, zp);
    check_cuda_ok(op, cuda::quantize_with_scale(xv.data_ptr(), t, rows, K, xv.stride(0), b, K,
                                                scale.data_ptr<float>(), zp.data_ptr<int8_t>(), 0, q.data_ptr(),
                                                stream()));
  } else {
    const int64_t g = group_len(group_size, K);
    // 4-bit with an odd group: a byte can hold values of two groups, so the
    // scales come first and the bytes are written by a second kernel.
    const bool split = bits == 4 && g % 2 == 1 && g != K;
    check_cuda_ok(op, cuda::quantize_segments(xv.data_ptr(), t, rows, K, xv.stride(0), b, symmetric, g, !split,
                                              q.data_ptr(), scale.data_ptr<float>(), zp.data_ptr<int8_t>(),
                                              stream()));
    if (split)
      check_cuda_ok(op, cuda::quantize_with_scale(xv.data_ptr(), t, rows, K, xv.stride(0), b, g,
                                                  scale.data_ptr<float>(), zp.data_ptr<int8_t>(), K / g,
                                                  q.data_ptr(), stream()));
  }
  return {q, scale, zp};
}

// Shapes (checks.h) and, unless a CUDA graph is being captured (a host read
// would break the capture), the values: scales finite and > 0, 4-bit
// zero-points within [-8, 7].
int64_t check_scales(const char* op, const at::Device& dev, at::IntArrayRef xs, const at::Tensor& scale,
                     const at::Tensor& zp, int64_t bits, int64_t group_size, bool check_values) {
  check_device(op, "scale", scale, dev);
  check_device(op, "zero_point", zp, dev);
  const int64_t sstride = check_scale_shapes(op, xs, scale, zp, group_size);
  // A small device-to-host copy (scales are per tensor / row / group).
  if (check_values && scale.numel() > 0 && !capturing()) check_scale_values(op, scale.cpu(), zp.cpu(), bits);
  return sstride;
}

at::Tensor quantize_static_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zp, int64_t bits,
                                int64_t group_size) {
  const char* op = "llmeasyquant.quantize_static";
  check_quant_input(op, x, bits, group_size, cuda_device(op, x, "x"));
  const int64_t sstride = check_scales(op, x.device(), x.sizes(), scale, zp, bits, group_size, true);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  at::Tensor q = q_storage(x.sizes(), bits, x.options());
  const at::Tensor s = scale.contiguous(), z = zp.contiguous();
  check_cuda_ok(op, cuda::quantize_with_scale(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), K, xv.stride(0),
                                              static_cast<int>(bits), group_len(group_size, K), s.data_ptr<float>(),
                                              z.data_ptr<int8_t>(), sstride, q.data_ptr(), stream()));
  return q;
}

at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp, int64_t bits,
                           int64_t group_size, int64_t K, at::ScalarType dtype) {
  const char* op = "llmeasyquant.dequantize";
  const std::vector<int64_t> xs = check_dequantize_args(op, q, bits, group_size, K, dtype, cuda_device(op, q, "q"));
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t sstride = check_scales(op, q.device(), xs, scale, zp, bits, group_size, false);
  const at::Tensor qc = q.contiguous(), s = scale.contiguous(), z = zp.contiguous();
  at::Tensor out = at::empty(xs, q.options().dtype(dtype));
  const int64_t rows = K ? out.numel() / K : 0;
  check_cuda_ok(op, cuda::dequantize(qc.data_ptr(), rows, K, static_cast<int>(bits), group_len(group_size, K),
                                     s.data_ptr<float>(), z.data_ptr<int8_t>(), sstride, out.data_ptr(),
                                     float_type(dtype), stream()));
  return out;
}

void channel_stats_cuda(const at::Tensor& x, at::Tensor& absmax, at::Tensor& mn, at::Tensor& mx) {
  const char* op = "llmeasyquant.channel_stats_";
  check_channel_stats_args(op, x, absmax, mn, mx, cuda_device(op, x, "x"));
  const int64_t K = x.size(-1);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xv = rows_view(x);
  const int chunks = cuda::channel_stats_chunks(xv.size(0));
  at::Tensor ws = at::empty({std::max<int64_t>(1, int64_t(chunks) * 3 * K)}, x.options().dtype(at::kFloat));
  check_cuda_ok(op, cuda::channel_stats_update(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), K, xv.stride(0),
                                               absmax.data_ptr<float>(), mn.data_ptr<float>(), mx.data_ptr<float>(),
                                               ws.data_ptr<float>(), chunks, stream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ema_quantize_cuda(const at::Tensor& x, at::Tensor& state, double alpha,
                                                                 double eps, int64_t bits, bool symmetric,
                                                                 bool update) {
  const char* op = "llmeasyquant.ema_quantize_";
  check_ema_args(op, x, state, alpha, eps, bits, cuda_device(op, x, "x"));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1);
  const at::Tensor xv = rows_view(x);
  const auto t = float_type(x.scalar_type());
  at::Tensor scale = at::empty({1}, x.options().dtype(at::kFloat));
  at::Tensor zp = at::empty({1}, x.options().dtype(at::kChar));
  int blocks = 0;
  at::Tensor partial;
  if (update && x.numel()) {
    blocks = cuda::minmax_blocks(x.numel());
    partial = at::empty({blocks * 3}, x.options().dtype(at::kFloat));
    check_cuda_ok(op, cuda::tensor_minmax_partial(xv.data_ptr(), t, xv.size(0), K, xv.stride(0),
                                                  partial.data_ptr<float>(), blocks, stream()));
  }
  check_cuda_ok(op, cuda::ema_update_scale(partial.defined() ? partial.data_ptr<float>() : nullptr, blocks,
                                           state.data_ptr<float>(), static_cast<float>(alpha),
                                           static_cast<float>(1.0 - alpha), static_cast<float>(eps),
                                           static_cast<int>(bits), symmetric, update, scale.data_ptr<float>(),
                                           zp.data_ptr<int8_t>(), stream()));
  at::Tensor q = q_storage(x.sizes(), bits, x.options());
  check_cuda_ok(op, cuda::quantize_with_scale(xv.data_ptr(), t, xv.size(0), K, xv.stride(0), static_cast<int>(bits), K,
                                              scale.data_ptr<float>(), zp.data_ptr<int8_t>(), 0, q.data_ptr(),
                                              stream()));
  return {q, scale, zp};
}

// ---- GEMM -----------------------------------------------------------------
// The mma / dp4a kernels read 16-byte vectors of K: rows are made contiguous,
// 16-byte aligned and K is zero-padded to a multiple of 16 (zeros add nothing
// to the integer products or to the weight row sums).
// cp.async / vector loads need 16-byte aligned rows; a contiguous view with
// a storage offset may not be.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

at::Tensor gemm_operand(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  const int64_t K = c.size(1);
  if (K % 16 != 0) return at::constant_pad_nd(c, {0, 16 - K % 16}, 0);
  return aligned16(c);
}

cuda::GemmPath gemm_path() {
  const char* v = std::getenv("LLMEQ_CUDA_GEMM");
  if (!v || !*v || std::strcmp(v, "auto") == 0) return cuda::GemmPath::Auto;
  if (std::strcmp(v, "mma") == 0) return cuda::GemmPath::Mma;
  if (std::strcmp(v, "dp4a") == 0) return cuda::GemmPath::Dp4a;
  TORCH_CHECK_VALUE(false, msg("LLMEQ_CUDA_GEMM must be auto, mma or dp4a, got '", v, "'"));
}

cuda::WoPath wo_path() {
  const char* v = std::getenv("LLMEQ_CUDA_WO");
  if (!v || !*v || std::strcmp(v, "auto") == 0) return cuda::WoPath::Auto;
  if (std::strcmp(v, "mma") == 0) return cuda::WoPath::Mma;
  if (std::strcmp(v, "gemv") == 0) return cuda::WoPath::Gemv;
  if (std::strcmp(v, "dequant") == 0) return cuda::WoPath::Dequant;
  // panel: QLinear's choice of the panel op (llmeasyquant/panel.py); a call
  // of this canonical op has no panel layout to run on, so it goes by auto.
  if (std::strcmp(v, "panel") == 0) return cuda::WoPath::Auto;
  TORCH_CHECK_VALUE(false, msg("LLMEQ_CUDA_WO must be auto, mma, gemv, dequant or panel, got '", v, "'"));
}

cuda::OutKind out_kind(at::ScalarType d) {
  return d == at::kFloat ? cuda::OutKind::F32 : d == at::kBFloat16 ? cuda::OutKind::BF16 : cuda::OutKind::F16;
}

void run_gemm(const char* op, const at::Tensor& a, const at::Tensor& b, cuda::Epilogue& ep) {
  const at::Tensor ap = gemm_operand(a), bp = gemm_operand(b);
  const int64_t M = ap.size(0), N = bp.size(0), K = ap.size(1);
  const cuda::GemmPath path = gemm_path();
  const int sms = sm_count();
  const int64_t wsn = cuda::gemm_s8_workspace(M, N, K, sms, path);
  at::Tensor ws = wsn ? at::empty({wsn}, a.options().dtype(at::kInt)) : at::Tensor();
  check_cuda_ok(op, cuda::gemm_s8(M, N, K, ap.data_ptr<int8_t>(), K, bp.data_ptr<int8_t>(), K, ep,
                                  wsn ? ws.data_ptr<int32_t>() : nullptr, sms, path, stream()));
}

at::Tensor int8_gemm_cuda(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "llmeasyquant.int8_gemm";
  check_gemm_operands(op, a, b, cuda_device(op, a, "a"));
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor c = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  if (a.size(1) == 0) return c.zero_();
  cuda::Epilogue ep;
  ep.out = c.data_ptr();
  ep.ldo = c.size(1);
  ep.kind = cuda::OutKind::I32;
  run_gemm(op, a, b, ep);
  return c;
}

// K == 0: every accumulator is 0, so the output is the bias (or 0), through
// the same fp32 epilogue.
at::Tensor empty_k_output(const at::Tensor& bias32, int64_t M, int64_t N, const at::TensorOptions& o,
                          at::ScalarType d) {
  at::Tensor out = at::zeros({M, N}, o.dtype(at::kFloat));
  if (bias32.defined()) out.add_(bias32.unsqueeze(0));
  return out.to(d);
}

at::Tensor scaled_int8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale,
                                 const c10::optional<at::Tensor>& a_zero, const at::Tensor& b,
                                 const at::Tensor& b_scale, const c10::optional<at::Tensor>& b_sum,
                                 const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const char* op = "llmeasyquant.scaled_int8_gemm";
  const at::Device dev = cuda_device(op, a, "a");
  check_gemm_operands(op, a, b, dev);
  const int64_t M = a.size(0), N = b.size(0);
  check_scaled_gemm_args(op, M, N, a_scale, a_zero, b_scale, b_sum, out_dtype, dev);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor az, bsum;
  if (a_zero.has_value()) {  // the correction needs the weight row sums
    az = a_zero->contiguous();
    bsum = b_sum.has_value() ? b_sum->contiguous() : b.sum(1, false, at::kInt);
  }
  const at::Tensor bias32 = bias_f32(op, bias, N, dev);
  if (a.size(1) == 0) return empty_k_output(bias32, M, N, a.options(), out_dtype);
  const at::Tensor as = a_scale.contiguous(), bs = b_scale.contiguous();
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  cuda::Epilogue ep;
  ep.a_scale = as.data_ptr<float>();
  ep.a_scale_stride = as.numel() == 1 ? 0 : 1;
  if (az.defined()) {
    ep.a_zero = az.data_ptr<int8_t>();
    ep.a_zero_stride = az.numel() == 1 ? 0 : 1;
    ep.b_sum = bsum.data_ptr<int32_t>();
  }
  ep.b_scale = bs.data_ptr<float>();
  ep.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.kind = out_kind(out_dtype);
  run_gemm(op, a, b, ep);
  return out;
}

at::Tensor dynamic_quant_linear_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                     const at::Tensor& w_sum, const c10::optional<at::Tensor>& bias,
                                     bool act_symmetric) {
  const char* op = "llmeasyquant.dynamic_quant_linear";
  const at::Device dev = cuda_device(op, x, "x");
  check_dynamic_linear_args(op, x, w, w_scale, w_sum, dev);
  const int64_t N = w.size(0), K = w.size(1);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor bias32 = bias_f32(op, bias, N, dev);
  const at::Tensor xv = rows_view(x);
  const int64_t M = xv.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0 || N == 0) return at::empty(out_shape, x.options());
  if (K == 0) return shaped_result(empty_k_output(bias32, M, N, x.options(), x.scalar_type()), out_shape);
  const at::Tensor ws = w_scale.contiguous(), wsum = w_sum.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  cuda::Epilogue ep;
  ep.b_scale = ws.data_ptr<float>();
  if (!act_symmetric) ep.b_sum = wsum.data_ptr<int32_t>();
  ep.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.kind = out_kind(x.scalar_type());
  // Decode sizes: quantize + dp4a GEMV in one launch (bit-identical to the
  // two-launch path below; LLMEQ_CUDA_GEMM=mma keeps the tensor-core path).
  const cuda::GemmPath path = gemm_path();
  if (M <= cuda::kDp4aAutoMaxM && path != cuda::GemmPath::Mma && cuda::gemv_s8_fused_supported(M, K) &&
      xv.stride(1) == 1) {
    const at::Tensor wv = aligned16(w.contiguous());
    check_cuda_ok(op, cuda::gemv_s8_fused_quant(M, N, K, xv.data_ptr(), float_type(x.scalar_type()), xv.stride(0),
                                                act_symmetric, wv.data_ptr<int8_t>(), K, ep, stream()));
    return shaped_result(out, out_shape);
  }
  // Per-token quantization pre-pass (one launch), then the GEMM with the
  // scales, zero-point correction and bias in its epilogue.
  at::Tensor qa = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor as = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor az = at::empty({M}, x.options().dtype(at::kChar));
  check_cuda_ok(op, cuda::quantize_segments(xv.data_ptr(), float_type(x.scalar_type()), M, K, xv.stride(0), 8,
                                            act_symmetric, K, true, qa.data_ptr(), as.data_ptr<float>(),
                                            az.data_ptr<int8_t>(), stream()));
  ep.a_scale = as.data_ptr<float>();
  if (!act_symmetric) ep.a_zero = az.data_ptr<int8_t>();
  run_gemm(op, qa, w, ep);
  return shaped_result(out, out_shape);
}

at::Tensor weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale,
                                   const c10::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
                                   const c10::optional<at::Tensor>& bias) {
  const char* op = "llmeasyquant.weight_only_linear";
  const at::Device dev = cuda_device(op, x, "x");
  check_weight_only_args(op, x, qw, bits, group_size, dev);
  const int64_t K = x.size(-1);
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t N = qw.size(0);
  const int64_t g = group_len(group_size, K);
  const at::Tensor zp =
      zero_point.has_value() ? *zero_point : at::zeros(scale.sizes(), scale.options().dtype(at::kChar));
  check_scales(op, dev, {N, K}, scale, zp, bits, group_size, false);
  const at::Tensor bias32 = bias_f32(op, bias, N, dev);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const at::Tensor sc = scale.contiguous(), zc = zp.contiguous(), qc = qw.contiguous();
  const auto t = float_type(x.scalar_type());
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  if (K == 0 || M == 0 || N == 0)  // no products: the bias (or 0), as on the CPU
    return shaped_result(empty_k_output(bias32, M, N, x.options(), x.scalar_type()), out_shape);
  const cuda::WoPath path = cuda::weight_only_path(M, wo_path());
  const bool kernel_ok = cuda::weight_only_supported(K, static_cast<int>(bits), g, t);
  if (kernel_ok && path != cuda::WoPath::Dequant) {
    const at::Tensor xv = aligned16(x.reshape({-1, K}).contiguous());
    const at::Tensor qv = aligned16(qc);
    at::Tensor out = at::empty({M, N}, x.options());
    check_cuda_ok(op, cuda::weight_only_gemm(M, N, K, xv.data_ptr(), t, K, qv.data_ptr(), static_cast<int>(bits), g,
                                             sc.data_ptr<float>(),
                                             zero_point.has_value() ? zc.data_ptr<int8_t>() : nullptr,
                                             bias32.defined() ? bias32.data_ptr<float>() : nullptr, out.data_ptr(),
                                             path, stream()));
    return shaped_result(out, out_shape);
  }
  if (t != cuda::FloatType::F32) {
    // Prefill-sized M in bf16/fp16: dequantize to x's dtype, then cuBLAS.
    at::Tensor w = at::empty({N, K}, x.options());
    check_cuda_ok(op, cuda::dequantize(qc.data_ptr(), N, K, static_cast<int>(bits), g, sc.data_ptr<float>(),
                                       zc.data_ptr<int8_t>(), K / g, w.data_ptr(), t, stream()));
    const at::Tensor out = at::linear(x, w, bias32.defined() ? c10::optional<at::Tensor>(bias32.to(x.scalar_type()))
                                                             : c10::optional<at::Tensor>());
    return shaped_result(out, out_shape);
  }
  // fp32 activations: dequantize to fp32 and multiply in fp32 (the
  // reference's own math; cuBLAS keeps fp32 unless TF32 is switched on).
  at::Tensor w = at::empty({N, K}, x.options().dtype(at::kFloat));
  check_cuda_ok(op, cuda::dequantize(qc.data_ptr(), N, K, static_cast<int>(bits), g, sc.data_ptr<float>(),
                                     zc.data_ptr<int8_t>(), K / g, w.data_ptr(), cuda::FloatType::F32, stream()));
  const at::Tensor out = at::linear(x.to(at::kFloat), w, bias32.defined() ? c10::optional<at::Tensor>(bias32)
                                                                          : c10::optional<at::Tensor>());
  return shaped_result(out.to(x.scalar_type()), out_shape);
}

// Compiled, not yet validated on a GPU (src/cuda/gemm_w4_panel.cu).
at::Tensor weight_only_linear_panel_cuda(const at::Tensor& x, const at::Tensor& qpanel, const at::Tensor& gparams,
                                         int64_t out_features, int64_t group_size,
                                         const c10::optional<at::Tensor>& bias) {
  const char* op = "llmeasyquant.weight_only_linear_panel";
  const at::Device dev = cuda_device(op, x, "x");
  check_panel_args(op, x, qpanel, gparams, out_features, group_size, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t K = x.size(-1), N = out_features;
  const int64_t g = group_size == -1 ? K : group_size;
  const at::Tensor bias32 = bias_f32(op, bias, N, dev);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  if (M == 0 || N == 0) return at::empty(out_shape, x.options());
  const at::Tensor xv = aligned16(x.reshape({-1, K}).contiguous());
  const at::Tensor qv = aligned16(qpanel.contiguous()), gv = aligned16(gparams.contiguous());
  at::Tensor out = at::empty({M, N}, x.options());
  check_cuda_ok(op, cuda::w4_panel_gemm(M, N, K, xv.data_ptr(), float_type(x.scalar_type()), K, qv.data_ptr<int32_t>(),
                                        gv.data_ptr<float>(), g, bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                                        out.data_ptr(), stream()));
  return shaped_result(out, out_shape);
}

// Compiled, not yet validated on a GPU (src/cuda/hadamard.cu).
at::Tensor hadamard_transform_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& had_m, double scale) {
  const char* op = "llmeasyquant.hadamard_transform";
  const at::Device dev = cuda_device(op, x, "x");
  const int64_t m = check_hadamard_args(op, x, had_m, dev);
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(n <= cuda::kHadamardMaxN, msg(op, ": the CUDA kernel takes rows of at most ", cuda::kHadamardMaxN,
                                                  " values (one row in shared memory), got ", n,
                                                  "; llmeasyquant.ops.hadamard_transform runs longer rows in PyTorch"));
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor xv = rows_view(x);
  const at::Tensor h = had_m.has_value() ? had_m->contiguous() : at::Tensor();
  at::Tensor out = at::empty({xv.size(0), n}, x.options());
  check_cuda_ok(op, cuda::hadamard_transform(xv.data_ptr(), float_type(x.scalar_type()), xv.size(0), n, xv.stride(0),
                                             h.defined() ? h.data_ptr<float>() : nullptr, m,
                                             static_cast<float>(scale), out.data_ptr(), stream()));
  return shaped_result(out, x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(llmeasyquant, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_static", &quantize_static_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("channel_stats_", &channel_stats_cuda);
  m.impl("ema_quantize_", &ema_quantize_cuda);
  m.impl("int8_gemm", &int8_gemm_cuda);
  m.impl("scaled_int8_gemm", &scaled_int8_gemm_cuda);
  m.impl("dynamic_quant_linear", &dynamic_quant_linear_cuda);
  m.impl("weight_only_linear", &weight_only_linear_cuda);
  m.impl("hadamard_transform", &hadamard_transform_cuda);
  m.impl("weight_only_linear_panel", &weight_only_linear_panel_cuda);
}

}  // namespace llmeq
