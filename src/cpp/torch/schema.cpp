// The one place that defines every op schema of LLMEasyQuant.
// CPU implementations: register_cpu.cpp; CUDA: src/cuda/register_cuda.cu;
// fake (meta) implementations for torch.compile: python/llmeasyquant/_fake.py;
// PyTorch kernels for devices without compiled ones: python/llmeasyquant/_fallback.py;
// pure-PyTorch reference semantics: python/llmeasyquant/_reference.py.
//
// group_size everywhere: 0 = per tensor, -1 = per row (channel / token),
// g > 0 = groups of g along the last dim.
#include <torch/library.h>

TORCH_LIBRARY(llmeasyquant, m) {
  // Dynamic quantization -> (q, scale fp32, zero_point int8).
  m.def("quantize(Tensor x, int bits, bool symmetric, int group_size) -> (Tensor, Tensor, Tensor)");
  // Quantization with given (static / calibrated) scales and zero-points.
  m.def("quantize_static(Tensor x, Tensor scale, Tensor zero_point, int bits, int group_size) -> Tensor");
  m.def(
      "dequantize(Tensor q, Tensor scale, Tensor zero_point, int bits, int group_size, int K, "
      "ScalarType dtype) -> Tensor");
  // Running per-channel statistics (calibration, SmoothQuant), updated in place.
  m.def("channel_stats_(Tensor x, Tensor(a!) absmax, Tensor(b!) min, Tensor(c!) max) -> ()");
  // Online EMA activation scale (paper Algorithm 1); state float32[4] updated in place.
  m.def(
      "ema_quantize_(Tensor x, Tensor(a!) state, float alpha, float eps, int bits, bool symmetric, "
      "bool update) -> (Tensor, Tensor, Tensor)");
  // Exact int8 x int8 -> int32, b given as [N, K].
  m.def("int8_gemm(Tensor a, Tensor b) -> Tensor");
  m.def(
      "scaled_int8_gemm(Tensor a, Tensor a_scale, Tensor? a_zero, Tensor b, Tensor b_scale, Tensor? b_sum, "
      "Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Paper Algorithm 2: per-token dynamic quantize + int8 GEMM, float in/out.
  m.def(
      "dynamic_quant_linear(Tensor x, Tensor w, Tensor w_scale, Tensor w_sum, Tensor? bias, "
      "bool act_symmetric) -> Tensor");
  // The same with the weight in the CPU's pre-packed panel layout
  // (llmeasyquant/cpu_pack.py, cpu_kernels.h "panel64", which cannot tell
  // K or N apart from their padded sizes: hence in_ / out_features):
  // QLinear's derived copy, never saved. CPU kernel only.
  m.def(
      "dynamic_quant_linear_packed(Tensor x, Tensor w_packed, Tensor w_scale, Tensor w_sum, int in_features, "
      "int out_features, Tensor? bias, bool act_symmetric) -> Tensor");
  // W8A16 / W4A16 group-wise weight-only linear.
  m.def(
      "weight_only_linear(Tensor x, Tensor qw, Tensor scale, Tensor? zero_point, int bits, int group_size, "
      "Tensor? bias) -> Tensor");
  // W4A8: per-token symmetric 8-bit activations x 4-bit group-wise weights,
  // an exact int32 product per group, group scales in fp32 after it (see
  // cpu_kernels.h gemm_w4a8). CPU kernel; the PyTorch kernel elsewhere.
  m.def("w4a8_linear(Tensor x, Tensor qw, Tensor w_scale, Tensor? w_zero, int group_size, Tensor? bias) -> Tensor");
  // The same with the weight in the CPU's pre-packed W4A8 layout
  // (llmeasyquant/cpu_pack.py pack_w4a8, cpu_kernels.h "w4panel16"):
  // QLinear's derived copy, never saved. CPU kernel only.
  m.def("w4a8_linear_packed(Tensor x, Tensor w_packed, Tensor gparams, int in_features, int out_features, "
        "int group_size, Tensor? bias) -> Tensor");
  // Walsh-Hadamard transform along the last dim, n = m * 2**k:
  // scale * x @ kron(had_m, S_p)^T (had_m float32 [m, m], None for m = 1);
  // fp32 arithmetic, x's dtype out. llmeasyquant/hadamard.py builds had_m.
  m.def("hadamard_transform(Tensor x, Tensor? had_m, float scale) -> Tensor");
  // W4A16 from the CUDA panel layout (llmeasyquant/panel.py, mma_layout.h):
  // weights formed in x's 16-bit dtype, fp32 accumulation. CUDA kernel; the
  // PyTorch kernel (panel.linear) everywhere else.
  m.def("weight_only_linear_panel(Tensor x, Tensor qpanel, Tensor gparams, int out_features, int group_size, "
        "Tensor? bias) -> Tensor");
  // Decode-step glue of LLaMA-form decoders (eval/fast_decode.py), HF's
  // arithmetic in one call each (kernels/decode_glue.cpp). CPU kernels; the
  // PyTorch kernel elsewhere. add_rms_norm -> (weight * norm(x + residual),
  // x + residual), residual None: x alone.
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // silu(gate) * up, gate and up [..., n] of one shape (views of one
  // joined gate/up output allowed).
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  // One decode position: q [B, H*D], k / v [B, Hkv*D]; RoPE(k) and v written
  // into the caches [B, Hkv, S, D] at pos, returns [B, H*D] attention over
  // positions 0..pos. cos / sin float32 [D] for pos.
  m.def("decode_attention_(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, "
        "Tensor sin, int pos, float scale) -> Tensor");
}
