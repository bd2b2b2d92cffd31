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

#include "checks.h"
#include "llmeq/cuda_kernels.h"

namespace llmeq {
namespace {

void check_cuda_ok(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, msg(op, ": CUDA kernel launch failed: ", cudaGetErrorString(e)));
}

void check_on(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, msg(op, ": expected ", name, " on ", dev, " (where the input is), got ", t.device()));
}

void check_x(const char* op, const at::Tensor& x, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), msg(op, ": the CUDA kernel got a tensor on ", x.device()));
  check_float(op, "x", x);
  check_bits(op, bits);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension, got a scalar"));
  check_group_size(op, group_size, x.size(-1));
}

at::Tensor q_storage(at::IntArrayRef xs, int64_t bits, const at::TensorOptions& o) {
  std::vector<int64_t> s(xs.begin(), xs.end());
  if (bits == 4) {
    s.back() = (s.back() + 1) / 2;
    return at::empty(s, o.dtype(at::kByte));
  }
  return at::empty(s, o.dtype(at::kChar));
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
  check_x(op, x, bits, group_size);
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
  check_on(op, "scale", scale, dev);
  check_on(op, "zero_point", zp, dev);
  const int64_t sstride = check_scale_shapes(op, xs, scale, zp, group_size);
  // A small device-to-host copy (scales are per tensor / row / group).
  if (check_values && scale.numel() > 0 && !capturing()) check_scale_values(op, scale.cpu(), zp.cpu(), bits);
  return sstride;
}

at::Tensor quantize_static_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zp, int64_t bits,
                                int64_t group_size) {
  const char* op = "llmeasyquant.quantize_static";
  check_x(op, x, bits, group_size);
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
  TORCH_CHECK(q.is_cuda(), msg(op, ": the CUDA kernel got a tensor on ", q.device()));
  check_bits(op, bits);
  TORCH_CHECK_VALUE(q.dim() >= 1, msg(op, ": expected q with at least 1 dimension"));
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, msg(op,
                   ": dtype must be float32, bfloat16 or float16, got ", dtype));
  check_dtype(op, "q", q, bits == 4 ? at::kByte : at::kChar);
  const int64_t want_last = bits == 4 ? (K + 1) / 2 : K;
  TORCH_CHECK_VALUE(K >= 0 && q.size(-1) == want_last, msg(op, ": q of shape ", shape_str(q), " does not hold K=", K,
                    " ", bits, "-bit values (last dim should be ", want_last, ")"));
  check_group_size(op, group_size, K);
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<int64_t> xs(q.sizes().begin(), q.sizes().end());
  xs.back() = K;
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
  TORCH_CHECK(x.is_cuda(), msg(op, ": the CUDA kernel got a tensor on ", x.device()));
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  const int64_t K = x.size(-1);
  for (auto* t : {&absmax, &mn, &mx}) {
    check_on(op, "running statistics", *t, x.device());
    check_dtype(op, "running statistics", *t, at::kFloat);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, msg(op, ": running statistics must have shape [", K,
                      "] (one per channel of x ", shape_str(x), "), got ", shape_str(*t)));
    TORCH_CHECK_VALUE(t->is_contiguous(), msg(op, ": running statistics must be contiguous"));
  }
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
  check_x(op, x, bits, 0);
  check_on(op, "state", state, x.device());
  check_dtype(op, "state", state, at::kFloat);
  TORCH_CHECK_VALUE(state.dim() == 1 && state.size(0) == 4 && state.is_contiguous(), msg(op,
                    ": state must be a contiguous float32 tensor of shape [4] (absmax, min, max, steps), got ",
                    shape_str(state)));
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha < 1.0, msg(op, ": alpha must be in [0, 1), got ", alpha));
  TORCH_CHECK_VALUE(eps > 0.0 && std::isfinite(eps), msg(op, ": eps must be finite and > 0, got ", eps));
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
  TORCH_CHECK_VALUE(false, msg("LLMEQ_CUDA_WO must be auto, mma, gemv or dequant, got '", v, "'"));
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

void check_gemm_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_cuda(), msg(op, ": the CUDA kernel got a tensor on ", a.device()));
  check_on(op, "b (weights)", b, a.device());
  check_gemm_shapes(op, a, b);
}

at::Tensor int8_gemm_cuda(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "llmeasyquant.int8_gemm";
  check_gemm_operands(op, a, b);
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

at::Tensor bias_f32(const char* op, const c10::optional<at::Tensor>& bias, int64_t N, const at::Device& dev) {
  if (!bias.has_value()) return at::Tensor();
  check_on(op, "bias", *bias, dev);
  check_float(op, "bias", *bias);
  check_numel(op, "bias", *bias, N, "one per output channel");
  return bias->to(at::kFloat).contiguous();
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
  check_gemm_operands(op, a, b);
  check_out_dtype(op, out_dtype);
  const int64_t M = a.size(0), N = b.size(0);
  const auto dev = a.device();
  const c10::cuda::CUDAGuard guard(dev);
  check_on(op, "a_scale", a_scale, dev);
  check_on(op, "b_scale", b_scale, dev);
  check_dtype(op, "a_scale", a_scale, at::kFloat);
  check_dtype(op, "b_scale", b_scale, at::kFloat);
  TORCH_CHECK_VALUE(a_scale.numel() == M || a_scale.numel() == 1, msg(op, ": a_scale must have M=", M,
                    " elements (per token) or 1 (per tensor), got ", shape_str(a_scale)));
  check_numel(op, "b_scale", b_scale, N, "one per output channel");
  at::Tensor az, bsum;
  if (a_zero.has_value()) {
    check_on(op, "a_zero", *a_zero, dev);
    check_dtype(op, "a_zero", *a_zero, at::kChar);
    TORCH_CHECK_VALUE(a_zero->numel() == M || a_zero->numel() == 1, msg(op, ": a_zero must have M=", M,
                      " elements or 1, got ", shape_str(*a_zero)));
    az = a_zero->contiguous();
    if (b_sum.has_value()) {
      check_on(op, "b_sum", *b_sum, dev);
      check_dtype(op, "b_sum", *b_sum, at::kInt);
      check_numel(op, "b_sum", *b_sum, N, "sum_k b[n, k] per output channel");
      bsum = b_sum->contiguous();
    } else {
      bsum = b.sum(1, false, at::kInt);
    }
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
  TORCH_CHECK(x.is_cuda(), msg(op, ": the CUDA kernel got a tensor on ", x.device()));
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  const auto dev = x.device();
  check_on(op, "w", w, dev);
  check_dtype(op, "w", w, at::kChar);
  TORCH_CHECK_VALUE(w.dim() == 2, msg(op, ": expected a 2-D weight, got ", shape_str(w)));
  TORCH_CHECK_VALUE(x.size(-1) == w.size(1), msg(op, ": K mismatch: x has K=", x.size(-1), " (shape ", shape_str(x),
                    ") but the weight has K=", w.size(1), " (shape ", shape_str(w), ")"));
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK_VALUE(K <= kMaxK, msg(op, ": K=", K, " exceeds the int32-exact limit ", kMaxK));
  check_on(op, "w_scale", w_scale, dev);
  check_on(op, "w_sum", w_sum, dev);
  check_dtype(op, "w_scale", w_scale, at::kFloat);
  check_dtype(op, "w_sum", w_sum, at::kInt);
  check_numel(op, "w_scale", w_scale, N, "one per output channel");
  check_numel(op, "w_sum", w_sum, N, "sum_k w[n, k] per output channel");
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor bias32 = bias_f32(op, bias, N, dev);
  const at::Tensor xv = rows_view(x);
  const int64_t M = xv.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0 || N == 0) return at::empty(out_shape, x.options());
  if (K == 0) return empty_k_output(bias32, M, N, x.options(), x.scalar_type()).reshape(out_shape);
  // Per-token quantization pre-pass (one launch), then the GEMM with the
  // scales, zero-point correction and bias in its epilogue.
  at::Tensor qa = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor as = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor az = at::empty({M}, x.options().dtype(at::kChar));
  check_cuda_ok(op, cuda::quantize_segments(xv.data_ptr(), float_type(x.scalar_type()), M, K, xv.stride(0), 8,
                                            act_symmetric, K, true, qa.data_ptr(), as.data_ptr<float>(),
                                            az.data_ptr<int8_t>(), stream()));
  const at::Tensor ws = w_scale.contiguous(), wsum = w_sum.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  cuda::Epilogue ep;
  ep.a_scale = as.data_ptr<float>();
  if (!act_symmetric) {
    ep.a_zero = az.data_ptr<int8_t>();
    ep.b_sum = wsum.data_ptr<int32_t>();
  }
  ep.b_scale = ws.data_ptr<float>();
  ep.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.kind = out_kind(x.scalar_type());
  run_gemm(op, qa, w, ep);
  return out.reshape(out_shape);
}

at::Tensor weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale,
                                   const c10::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
                                   const c10::optional<at::Tensor>& bias) {
  const char* op = "llmeasyquant.weight_only_linear";
  TORCH_CHECK(x.is_cuda(), msg(op, ": the CUDA kernel got a tensor on ", x.device()));
  check_float(op, "x", x);
  check_bits(op, bits);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  const auto dev = x.device();
  check_on(op, "qw", qw, dev);
  check_dtype(op, "qw", qw, bits == 4 ? at::kByte : at::kChar);
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(qw.dim() == 2 && qw.size(1) == (bits == 4 ? (K + 1) / 2 : K), msg(op, ": K mismatch: x has K=", K,
                    " (shape ", shape_str(x), ") but the ", bits, "-bit weight has shape ", shape_str(qw),
                    " (expected [N, ", (bits == 4 ? (K + 1) / 2 : K), "])"));
  TORCH_CHECK_VALUE(group_size != 0, msg(op, ": weight-only linear takes per-channel (-1) or group-wise scales, got 0"));
  check_group_size(op, group_size, K);
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
  const int64_t M = K ? x.numel() / K : 0;
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
    return out.reshape(out_shape);
  }
  if (t != cuda::FloatType::F32) {
    // Prefill-sized M in bf16/fp16: dequantize to x's dtype, then cuBLAS.
    at::Tensor w = at::empty({N, K}, x.options());
    check_cuda_ok(op, cuda::dequantize(qc.data_ptr(), N, K, static_cast<int>(bits), g, sc.data_ptr<float>(),
                                       zc.data_ptr<int8_t>(), K / g, w.data_ptr(), t, stream()));
    const at::Tensor out = at::linear(x, w, bias32.defined() ? c10::optional<at::Tensor>(bias32.to(x.scalar_type()))
                                                             : c10::optional<at::Tensor>());
    return out.reshape(out_shape);
  }
  // fp32 activations: dequantize to fp32 and multiply in fp32 (the
  // reference's own math; cuBLAS keeps fp32 unless TF32 is switched on).
  at::Tensor w = at::empty({N, K}, x.options().dtype(at::kFloat));
  check_cuda_ok(op, cuda::dequantize(qc.data_ptr(), N, K, static_cast<int>(bits), g, sc.data_ptr<float>(),
                                     zc.data_ptr<int8_t>(), K / g, w.data_ptr(), cuda::FloatType::F32, stream()));
  const at::Tensor out = at::linear(x.to(at::kFloat), w, bias32.defined() ? c10::optional<at::Tensor>(bias32)
                                                                          : c10::optional<at::Tensor>());
  return out.to(x.scalar_type()).reshape(out_shape);
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
}

}  // namespace llmeq
