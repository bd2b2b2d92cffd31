// Argument checks of each op, shared by the CPU and CUDA implementations:
// every tensor on the expected device, dtypes, shapes, ranges. Each message
// says which op, what was expected and what came (checks.h builds them).
// python/llmeasyquant/_checks.py mirrors every check here, in the same order
// with the same messages (the fakes and the reference run it): change both.
#pragma once

#include "checks.h"

namespace llmeq {

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, msg(op, ": expected ", name, " on ", dev, " (where the input is), got ", t.device()));
}

// quantize / quantize_static / ema_quantize_ input.
inline void check_quant_input(const char* op, const at::Tensor& x, int64_t bits, int64_t group_size,
                              const at::Device& dev) {
  check_device(op, "x", x, dev);
  check_float(op, "x", x);
  check_bits(op, bits, dev.is_cpu());
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension, got a scalar"));
  check_group_size(op, group_size, x.size(-1));
}

// dequantize: returns the shape of the dequantized tensor.
inline std::vector<int64_t> check_dequantize_args(const char* op, const at::Tensor& q, int64_t bits,
                                                  int64_t group_size, int64_t K, at::ScalarType dtype,
                                                  const at::Device& dev) {
  check_device(op, "q", q, dev);
  check_bits(op, bits, dev.is_cpu());
  TORCH_CHECK_VALUE(q.dim() >= 1, msg(op, ": expected q with at least 1 dimension"));
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   msg(op, ": dtype must be float32, bfloat16 or float16, got ", dtype));
  check_dtype(op, "q", q, bits != 8 ? at::kByte : at::kChar);
  const int64_t want_last = K >= 0 ? packed_row_bytes(K, static_cast<int>(bits)) : -1;
  TORCH_CHECK_VALUE(K >= 0 && q.size(-1) == want_last, msg(op, ": q of shape ", shape_str(q), " does not hold K=", K,
                                                            " ", bits, "-bit values (last dim should be ", want_last,
                                                            ")"));
  check_group_size(op, group_size, K);
  std::vector<int64_t> xs(q.sizes().begin(), q.sizes().end());
  xs.back() = K;
  return xs;
}

inline void check_channel_stats_args(const char* op, const at::Tensor& x, const at::Tensor& absmax,
                                     const at::Tensor& mn, const at::Tensor& mx, const at::Device& dev) {
  check_device(op, "x", x, dev);
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  const int64_t K = x.size(-1);
  for (const at::Tensor* t : {&absmax, &mn, &mx}) {
    check_device(op, "running statistics", *t, dev);
    check_dtype(op, "running statistics", *t, at::kFloat);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, msg(op, ": running statistics must have shape [", K,
                                                             "] (one per channel of x ", shape_str(x), "), got ",
                                                             shape_str(*t)));
    TORCH_CHECK_VALUE(t->is_contiguous(), msg(op, ": running statistics must be contiguous"));
  }
}

inline void check_ema_args(const char* op, const at::Tensor& x, const at::Tensor& state, double alpha, double eps,
                           int64_t bits, const at::Device& dev) {
  check_quant_input(op, x, bits, 0, dev);
  check_device(op, "state", state, dev);
  check_dtype(op, "state", state, at::kFloat);
  TORCH_CHECK_VALUE(state.dim() == 1 && state.size(0) == 4 && state.is_contiguous(),
                    msg(op, ": state must be a contiguous float32 tensor of shape [4] (absmax, min, max, steps), got ",
                        shape_str(state)));
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha < 1.0, msg(op, ": alpha must be in [0, 1), got ", alpha));
  TORCH_CHECK_VALUE(eps > 0.0 && std::isfinite(eps), msg(op, ": eps must be finite and > 0, got ", eps));
}

inline void check_gemm_operands(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Device& dev) {
  check_device(op, "a", a, dev);
  check_device(op, "b (weights)", b, dev);
  check_gemm_shapes(op, a, b);
}

// scaled_int8_gemm's scales, zero-points and row sums (operands checked above).
inline void check_scaled_gemm_args(const char* op, int64_t M, int64_t N, const at::Tensor& a_scale,
                                   const c10::optional<at::Tensor>& a_zero, const at::Tensor& b_scale,
                                   const c10::optional<at::Tensor>& b_sum, at::ScalarType out_dtype,
                                   const at::Device& dev) {
  check_out_dtype(op, out_dtype);
  check_device(op, "a_scale", a_scale, dev);
  check_device(op, "b_scale", b_scale, dev);
  check_dtype(op, "a_scale", a_scale, at::kFloat);
  check_dtype(op, "b_scale", b_scale, at::kFloat);
  TORCH_CHECK_VALUE(a_scale.numel() == M || a_scale.numel() == 1,
                    msg(op, ": a_scale must have M=", M, " elements (per token) or 1 (per tensor), got ",
                        shape_str(a_scale)));
  check_numel(op, "b_scale", b_scale, N, "one per output channel");
  if (a_zero.has_value()) {
    check_device(op, "a_zero", *a_zero, dev);
    check_dtype(op, "a_zero", *a_zero, at::kChar);
    TORCH_CHECK_VALUE(a_zero->numel() == M || a_zero->numel() == 1,
                      msg(op, ": a_zero must have M=", M, " elements or 1, got ", shape_str(*a_zero)));
  }
  if (b_sum.has_value()) {
    check_device(op, "b_sum", *b_sum, dev);
    check_dtype(op, "b_sum", *b_sum, at::kInt);
    check_numel(op, "b_sum", *b_sum, N, "sum_k b[n, k] per output channel");
  }
}

// The W8A8 linears' per-channel parameters: fp32 scales and int32 row sums, N each.
inline void check_channel_params(const char* op, const at::Tensor& w_scale, const at::Tensor& w_sum, int64_t N,
                                 const at::Device& dev) {
  check_device(op, "w_scale", w_scale, dev);
  check_device(op, "w_sum", w_sum, dev);
  check_dtype(op, "w_scale", w_scale, at::kFloat);
  check_dtype(op, "w_sum", w_sum, at::kInt);
  check_numel(op, "w_scale", w_scale, N, "one per output channel");
  check_numel(op, "w_sum", w_sum, N, "sum_k w[n, k] per output channel");
}

inline void check_dynamic_linear_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& w_scale, const at::Tensor& w_sum, const at::Device& dev) {
  check_device(op, "x", x, dev);
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  check_device(op, "w", w, dev);
  check_dtype(op, "w", w, at::kChar);
  TORCH_CHECK_VALUE(w.dim() == 2, msg(op, ": expected a 2-D weight, got ", shape_str(w)));
  TORCH_CHECK_VALUE(x.size(-1) == w.size(1), msg(op, ": K mismatch: x has K=", x.size(-1), " (shape ", shape_str(x),
                                                 ") but the weight has K=", w.size(1), " (shape ", shape_str(w), ")"));
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK_VALUE(K <= kMaxK, msg(op, ": K=", K, " exceeds the int32-exact limit ", kMaxK));
  check_channel_params(op, w_scale, w_sum, N, dev);
}

// The pre-packed layouts pad K and N, so the packed ops take in_features and
// out_features: x must have K = in_features (the padded sizes cannot say).
inline void check_packed_x(const char* op, const at::Tensor& x, int64_t in_features, int64_t out_features,
                           const at::Device& dev) {
  check_device(op, "x", x, dev);
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  TORCH_CHECK_VALUE(in_features >= 0 && out_features >= 0,
                    msg(op, ": expected in_features, out_features >= 0, got ", in_features, ", ", out_features));
  TORCH_CHECK_VALUE(x.size(-1) == in_features, msg(op, ": K mismatch: x has K=", x.size(-1), " (shape ", shape_str(x),
                                                   ") but the weight has K=", in_features, " (in_features)"));
  TORCH_CHECK_VALUE(in_features <= kMaxK, msg(op, ": K=", in_features, " exceeds the int32-exact limit ", kMaxK));
}

// w4a8_linear_packed: the weight in the pre-packed W4A8 layout (cpu_kernels.h
// "w4panel16") of an [out_features, in_features] weight: w_packed uint8
// [ceil(N/16), w4_panel_bytes(K)], gparams float32 [ceil(N/16), G, 2, 16].
inline void check_w4a8_packed_args(const char* op, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& gp,
                                   int64_t in_features, int64_t out_features, int64_t group_size,
                                   const at::Device& dev) {
  check_packed_x(op, x, in_features, out_features, dev);
  const int64_t K = in_features;
  TORCH_CHECK_VALUE(group_size != 0, msg(op, ": expected per-channel (-1) or group-wise (g > 0) weight scales, got ",
                                         "group_size=0 (per tensor)"));
  check_group_size(op, group_size, K);
  const int64_t P = (out_features + cpu::kW4PanelCols - 1) / cpu::kW4PanelCols;
  const int64_t G = group_size > 0 ? K / group_size : 1;  // per channel: one group (K = 0 included)
  check_device(op, "w_packed", wp, dev);
  check_dtype(op, "w_packed", wp, at::kByte);
  TORCH_CHECK_VALUE(wp.dim() == 2 && wp.size(0) == P && wp.size(1) == cpu::w4_panel_bytes(K),
                    msg(op, ": expected w_packed of shape [", P, ", ", cpu::w4_panel_bytes(K), "] (the W4A8 layout of an [N=",
                        out_features, ", K=", K, "] weight: llmeasyquant.cpu_pack.pack_w4a8), got ", shape_str(wp)));
  check_device(op, "gparams", gp, dev);
  check_dtype(op, "gparams", gp, at::kFloat);
  TORCH_CHECK_VALUE(gp.dim() == 4 && gp.size(0) == P && gp.size(1) == G && gp.size(2) == 2 &&
                        gp.size(3) == cpu::kW4PanelCols,
                    msg(op, ": expected gparams of shape [", P, ", ", G, ", 2, 16], got ", shape_str(gp)));
}

// dynamic_quant_linear_packed: dynamic_quant_linear's rules with the weight
// in the pre-packed panel layout (cpu_kernels.h "panel64") of an
// [out_features, in_features] weight: [ceil(N/64), s8_panel_bytes(K)].
inline void check_dynamic_linear_packed_args(const char* op, const at::Tensor& x, const at::Tensor& wp,
                                             const at::Tensor& w_scale, const at::Tensor& w_sum, int64_t in_features,
                                             int64_t out_features, const at::Device& dev) {
  check_packed_x(op, x, in_features, out_features, dev);
  const int64_t N = out_features, K = in_features;
  check_channel_params(op, w_scale, w_sum, N, dev);
  check_device(op, "w_packed", wp, dev);
  check_dtype(op, "w_packed", wp, at::kChar);
  const int64_t panels = (N + cpu::kS8PanelCols - 1) / cpu::kS8PanelCols;
  TORCH_CHECK_VALUE(wp.dim() == 2 && wp.size(0) == panels && wp.size(1) == cpu::s8_panel_bytes(K),
                    msg(op, ": expected w_packed of shape [", panels, ", ", cpu::s8_panel_bytes(K),
                        "] (the panel layout of an [N=", N, ", K=", K, "] weight: llmeasyquant.cpu_pack), got ",
                        shape_str(wp)));
}

inline void check_weight_only_args(const char* op, const at::Tensor& x, const at::Tensor& qw, int64_t bits,
                                   int64_t group_size, const at::Device& dev) {
  check_device(op, "x", x, dev);
  check_float(op, "x", x);
  check_bits(op, bits, dev.is_cpu());
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  check_device(op, "qw", qw, dev);
  check_dtype(op, "qw", qw, bits != 8 ? at::kByte : at::kChar);
  const int64_t K = x.size(-1);
  const int64_t kq = packed_row_bytes(K, static_cast<int>(bits));
  TORCH_CHECK_VALUE(qw.dim() == 2 && qw.size(1) == kq,
                    msg(op, ": K mismatch: x has K=", K, " (shape ", shape_str(x), ") but the ", bits,
                        "-bit weight has shape ", shape_str(qw), " (expected [N, ", kq, "])"));
  TORCH_CHECK_VALUE(group_size != 0, msg(op, ": expected per-channel (-1) or group-wise (g > 0) weight scales, got ",
                                         "group_size=0 (per tensor)"));
  check_group_size(op, group_size, K);
}

// w4a8_linear: weight_only_linear's x / qw / group rules at 4 bits, and K
// within the int32-exact limit of the group products.
inline void check_w4a8_args(const char* op, const at::Tensor& x, const at::Tensor& qw, int64_t group_size,
                            const at::Device& dev) {
  check_weight_only_args(op, x, qw, 4, group_size, dev);
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(K <= kMaxK, msg(op, ": K=", K, " exceeds the int32-exact limit ", kMaxK));
}

// hadamard_transform: x [..., n] float, had_m float32 [m, m] (or none: m = 1),
// n = m * 2**k. Returns m.
inline int64_t check_hadamard_args(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& had_m,
                                   const at::Device& dev) {
  check_device(op, "x", x, dev);
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension, got a scalar"));
  int64_t m = 1;
  if (had_m.has_value()) {
    check_device(op, "had_m", *had_m, dev);
    check_dtype(op, "had_m", *had_m, at::kFloat);
    TORCH_CHECK_VALUE(had_m->dim() == 2 && had_m->size(0) == had_m->size(1) && had_m->size(0) >= 1,
                      msg(op, ": expected had_m a square 2-D matrix [m, m], got ", shape_str(*had_m)));
    m = had_m->size(0);
  }
  const int64_t n = x.size(-1);
  const int64_t p = n / m;
  TORCH_CHECK_VALUE(n % m == 0 && p >= 1 && (p & (p - 1)) == 0,
                    msg(op, ": expected the last dim of x to be m * 2**k with m = ", m,
                        had_m.has_value() ? " (the size of had_m)" : " (no had_m)", ", got ", n, " (x ",
                        shape_str(x), ")"));
  return m;
}

// weight_only_linear_panel: x bf16/fp16 [..., K] with K % 16 == 0; qpanel
// int32 [ceil(N/64), ceil(K/64) * 4, 32, 4]; gparams float32
// [ceil(N/64), K/g, 2, 8, 8]; g = K (group_size -1 or K) or g % 64 == 0
// dividing K (llmeasyquant/panel.py makes both).
inline void check_panel_args(const char* op, const at::Tensor& x, const at::Tensor& qpanel, const at::Tensor& gparams,
                             int64_t out_features, int64_t group_size, const at::Device& dev) {
  check_device(op, "x", x, dev);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                    msg(op, ": expected x bfloat16 or float16 (a 16-bit kernel), got ", x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, msg(op, ": expected x with at least 1 dimension"));
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(K > 0 && K % 16 == 0, msg(op, ": expected K (the last dim of x) a positive multiple of 16, got ",
                                              K, " (x ", shape_str(x), ")"));
  TORCH_CHECK_VALUE(out_features >= 0, msg(op, ": expected out_features >= 0, got ", out_features));
  const int64_t g = group_size == -1 ? K : group_size;
  TORCH_CHECK_VALUE(g == K || (g > 0 && g % 64 == 0 && K % g == 0),
                    msg(op, ": expected group_size -1, K or a multiple of 64 dividing K=", K, ", got ", group_size));
  check_device(op, "qpanel", qpanel, dev);
  check_dtype(op, "qpanel", qpanel, at::kInt);
  const int64_t P = (out_features + 63) / 64, K16 = (K + 63) / 64 * 4;
  TORCH_CHECK_VALUE(qpanel.sizes() == at::IntArrayRef({P, K16, 32, 4}),
                    msg(op, ": expected qpanel of shape [", P, ", ", K16, ", 32, 4] for out_features=", out_features,
                        ", K=", K, ", got ", shape_str(qpanel)));
  check_device(op, "gparams", gparams, dev);
  check_dtype(op, "gparams", gparams, at::kFloat);
  TORCH_CHECK_VALUE(gparams.sizes() == at::IntArrayRef({P, K / g, 2, 8, 8}),
                    msg(op, ": expected gparams of shape [", P, ", ", K / g, ", 2, 8, 8] for out_features=",
                        out_features, ", K=", K, ", group size ", g, ", got ", shape_str(gparams)));
}

// bias as contiguous fp32 (undefined when absent).
inline at::Tensor bias_f32(const char* op, const c10::optional<at::Tensor>& bias, int64_t N, const at::Device& dev) {
  if (!bias.has_value()) return at::Tensor();
  check_device(op, "bias", *bias, dev);
  check_float(op, "bias", *bias);
  check_numel(op, "bias", *bias, N, "one per output channel");
  return bias->to(at::kFloat).contiguous();
}

// add_rms_norm: x float [..., n], n >= 1; residual (optional) of x's shape
// and dtype; weight [n] of x's dtype; eps >= 0.
inline void check_add_rms_norm_args(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& weight, double eps, const at::Device& dev) {
  check_device(op, "x", x, dev);
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1,
                    msg(op, ": expected x with at least 1 dimension and a non-empty last dim, got ", shape_str(x)));
  if (residual.has_value()) {
    check_device(op, "residual", *residual, dev);
    check_dtype(op, "residual", *residual, x.scalar_type());
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), msg(op, ": expected residual of x's shape ", shape_str(x),
                                                          ", got ", shape_str(*residual)));
  }
  check_device(op, "weight", weight, dev);
  check_dtype(op, "weight", weight, x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1),
                    msg(op, ": expected weight of shape [", x.size(-1), "] (the last dim of x), got ", shape_str(weight)));
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), msg(op, ": expected a finite eps >= 0, got ", eps));
}

// silu_mul: gate, up float of one shape and dtype, at least 1 dimension.
inline void check_silu_mul_args(const char* op, const at::Tensor& gate, const at::Tensor& up, const at::Device& dev) {
  check_device(op, "gate", gate, dev);
  check_float(op, "gate", gate);
  check_device(op, "up", up, dev);
  check_dtype(op, "up", up, gate.scalar_type());
  TORCH_CHECK_VALUE(gate.dim() >= 1, msg(op, ": expected gate with at least 1 dimension, got a scalar"));
  TORCH_CHECK_VALUE(up.sizes() == gate.sizes(), msg(op, ": expected up of gate's shape ", shape_str(gate), ", got ",
                                                    shape_str(up)));
}

// decode_attention_: q [B, H*D], k / v [B, Hkv*D] of one float dtype; caches
// [B, Hkv, S, D] contiguous, that dtype; D even; H a multiple of Hkv;
// 0 <= pos < S; cos / sin float32 [D].
inline void check_decode_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cos,
                                        const at::Tensor& sin, int64_t pos, const at::Device& dev) {
  check_device(op, "q", q, dev);
  check_float(op, "q", q);
  const auto dt = q.scalar_type();
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}, {"k_cache", &k_cache},
                         {"v_cache", &v_cache}}) {
    check_device(op, name, *t, dev);
    check_dtype(op, name, *t, dt);
  }
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(3) >= 2 &&
                        k_cache.size(3) % 2 == 0,
                    msg(op, ": expected k_cache and v_cache of one shape [batch, kv_heads, max_pos, head_dim] with "
                        "an even head_dim, got ", shape_str(k_cache), " and ", shape_str(v_cache)));
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(),
                    msg(op, ": expected contiguous k_cache and v_cache (written in place)"));
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK_VALUE(q.dim() == 2 && q.size(0) == B && q.size(1) >= D && q.size(1) % (Hkv * D) == 0,
                    msg(op, ": expected q of shape [", B, ", heads * ", D, "] with heads a multiple of kv_heads=", Hkv,
                        " (the caches' ", shape_str(k_cache), "), got ", shape_str(q)));
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}})
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == Hkv * D,
                      msg(op, ": expected ", name, " of shape [", B, ", ", Hkv * D, "] (kv_heads * head_dim), got ",
                          shape_str(*t)));
  TORCH_CHECK_VALUE(pos >= 0 && pos < S, msg(op, ": expected 0 <= pos < max_pos=", S, ", got pos=", pos));
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"cos", &cos}, {"sin", &sin}}) {
    check_device(op, name, *t, dev);
    check_dtype(op, name, *t, at::kFloat);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == D,
                      msg(op, ": expected ", name, " of shape [", D, "] (head_dim), got ", shape_str(*t)));
  }
}

}  // namespace llmeq
