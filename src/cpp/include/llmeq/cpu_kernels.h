// Torch-free CPU kernels of LLMEasyQuant: raw pointers + sizes only.
//
// Semantics are defined by python/llmeasyquant/_reference.py; every function
// here must agree with it (bit-for-bit where the math is integer or the float
// operations are the same IEEE ops in the same order).
//
// Conventions shared with the CUDA side (src/cuda) and the reference:
//  * Matrices are row-major with an explicit row stride in elements.
//  * Quantized values are signed: q in [qmin, qmax] = [-2^(b-1), 2^(b-1)-1].
//    Dequantization is x = scale * (q - zero_point).
//  * 4-bit values are packed two per byte along the last (K) dimension:
//    element 2i in the low nibble, element 2i+1 in the high nibble, each a
//    two's-complement nibble; an odd K leaves the last high nibble 0.
//  * Scales are fp32, zero-points int8.
#pragma once

#include <cstdint>

namespace llmeq {
namespace cpu {

// ---------------------------------------------------------------------------
// Instruction-set dispatch
// ---------------------------------------------------------------------------
// The tiers form two chains that share only the scalar path:
//   x86-64:  scalar < avx2 < avx512_vnni < avx512_amx
//   aarch64: scalar < neon < neon_dotprod
// A build compiles the SIMD tiers of its own architecture only.
// avx512_amx is avx512_vnni plus Intel AMX-INT8 tile GEMMs (Sapphire Rapids
// and later, with the Linux kernel's permission for tile data): every kernel
// without an AMX variant runs its AVX-512 code there; has_avx512() says
// whether a tier has those.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, Neon = 3, NeonDotprod = 4, Avx512Amx = 5 };

// The best ISA this CPU supports, capped by the environment variable
// LLMEQ_CPU_ISA=scalar|avx2|avx512_vnni|avx512_amx|neon|neon_dotprod (read on every
// call, so tests can exercise each path in one process).  A cap above the
// CPU's best tier is the best tier; a tier of the other architecture's chain
// (e.g. neon on x86-64) caps to scalar, the only tier the chains share; an
// unknown value is ignored (no cap), as it always was.
Isa active_isa();
// Best ISA the CPU supports (ignores the environment cap).
Isa detected_isa();
const char* isa_name(Isa isa);
// True when `isa` is `cap` or below it on cap's chain (scalar is below every
// tier): the tiers a run capped at `cap` may use.
bool isa_within(Isa isa, Isa cap);
// The tiers that run the AVX-512 VNNI kernels (avx512_vnni, avx512_amx).
inline bool has_avx512(Isa isa) { return isa == Isa::Avx512Vnni || isa == Isa::Avx512Amx; }

// Element types the kernels read/write for float tensors.
enum class FloatType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---------------------------------------------------------------------------
// Quantize / dequantize (src/cpp/kernels/quantize.cpp)
// ---------------------------------------------------------------------------
// x: [rows, K] with row stride ldx (elements of `xtype`).
// group_size: K  -> one scale per row (per-channel / per-token);
//             g  -> K % g == 0, scales [rows, K/g];
// (per-tensor quantization is done by the op layer with a precomputed scale.)
// Writes q (bits 8: int8 [rows, K]; bits 4: uint8 [rows, ceil(K/2)], packed),
// scale [rows, K/g] fp32 and zero_point [rows, K/g] int8 (0 when symmetric).
void quantize_dynamic(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx,
                      int bits, bool symmetric, int64_t group_size, void* q, float* scale,
                      int8_t* zero_point, int num_threads);

// Quantize with given scales/zero-points; scale_stride_row is 0 for one scale
// shared by all rows (per-tensor), otherwise K/group_size.
void quantize_with_scale(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx,
                         int bits, int64_t group_size, const float* scale,
                         const int8_t* zero_point, int64_t scale_stride_row, void* q,
                         int num_threads);

// Per-row symmetric/asymmetric 8-bit quantization straight into the offset
// layout the VNNI GEMM consumes: u8 = q + 128 (vpdpbusd multiplies unsigned by
// signed bytes), scale[r], and corr[r] = 128 + zero_point[r] (the epilogue
// subtracts corr[r] * sum_k B[n,k]). Used by the fused dynamic linear.
void quantize_rows_u8(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx,
                      bool symmetric, uint8_t* q_u8, int64_t ldq, float* scale, int32_t* corr,
                      int num_threads);

void dequantize(const void* q, int64_t rows, int64_t K, int bits, int64_t group_size,
                const float* scale, const int8_t* zero_point, int64_t scale_stride_row,
                void* out, FloatType otype, int num_threads);

// ---------------------------------------------------------------------------
// Reductions (src/cpp/kernels/reduce.cpp)
// ---------------------------------------------------------------------------
// Per-channel (last dim) statistics over `rows` rows of x, folded into the
// running absmax/min/max (each [K] fp32, updated in place; NaN in x propagates).
void channel_stats_update(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx,
                          float* absmax, float* mn, float* mx, int num_threads);

// Whole-tensor absmax/min/max of x ([rows, K], stride ldx) -> out[0..2].
void tensor_minmax(const void* x, FloatType xtype, int64_t rows, int64_t K, int64_t ldx,
                   float* out3, int num_threads);

// ---------------------------------------------------------------------------
// int8 GEMM (src/cpp/kernels/gemm_*.cpp)
// ---------------------------------------------------------------------------
// Epilogue applied to the exact int32 accumulator acc[m,n] = sum_k A[m,k]*B[n,k]
// of an unsigned-A x signed-B product:
//   out[m,n] = a_scale[m*a_scale_stride] * b_scale[n]
//              * float(acc[m,n] - a_corr[m*a_corr_stride] * b_sum[n])  + bias[n]
// a_corr / b_sum may be null (no correction), bias may be null.
// The subtraction is done in int32 (exact), then converted to fp32.
struct GemmEpilogue {
  const float* a_scale = nullptr;  // [M] or [1]
  int64_t a_scale_stride = 1;      // 1 per token, 0 per tensor
  const int32_t* a_corr = nullptr; // [M] or [1]: 128 + activation zero-point
  int64_t a_corr_stride = 1;
  const float* b_scale = nullptr;  // [N]
  const int32_t* b_sum = nullptr;  // [N]: sum_k B[n,k]
  const float* bias = nullptr;     // [N] fp32
  void* out = nullptr;             // [M, N] row stride ldo
  int64_t ldo = 0;
  FloatType out_type = FloatType::F32;
};

// C[m,n] = sum_k A[m,k] * B[n,k] (A uint8 [M,K] stride lda, B int8 [N,K] stride
// ldb, C int32 [M,N] stride ldc). Exact (no saturation) for K <= 65536.
void gemm_u8s8s32(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                  const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc, int num_threads);

// Same product with the epilogue above fused per tile (no int32 C in memory).
void gemm_u8s8_scaled(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                      const int8_t* B, int64_t ldb, const GemmEpilogue& ep, int num_threads);

// Pre-packed weights ("panel64", derived once per layer by QLinear and never
// saved): B [N, K] as ceil(N/64) panels of 64 columns, each panel
// ceil(K/4) rows of 64 x 4 bytes, i.e. byte (n, k) at
//   (n / 64) * s8_panel_bytes(K) + ((k / 4) * 64 + n % 64) * 4 + k % 4,
// zero where n >= N or k >= K. It is the layout vpdpbusd consumes with one
// broadcast activation dword per 64 columns (gemm_s8_avx512.cpp); the same
// layout in PyTorch: llmeasyquant/cpu_pack.py.  It is also an AMX B tile as
// it stands: 16 rows of k-quads x (16 columns x 4 bytes) at a row stride of
// 256 bytes (gemm_s8_amx.cpp).
constexpr int64_t kS8PanelCols = 64;
inline int64_t s8_panel_bytes(int64_t K) { return (K + 3) / 4 * kS8PanelCols * 4; }
void pack_s8_panels(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int8_t* dst);
// The products above with B in that layout; results bit-identical to the
// row-major entry points (same exact int32 sums, same epilogue).
void gemm_u8s8s32_prepacked(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                            const int8_t* Bp, int32_t* C, int64_t ldc, int num_threads);
void gemm_u8s8_prepacked_scaled(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                                const int8_t* Bp, const GemmEpilogue& ep, int num_threads);
// Whether the tier in use (LLMEQ_CPU_ISA cap included) has the SIMD kernels
// of both pre-packed layouts, this one and "w4panel16" below (avx512_vnni,
// avx512_amx);
// elsewhere their entry points run a scalar loop.
bool has_prepacked_simd();

// sum_k B[n,k] for each row n (int32).
void row_sums_s8(const int8_t* B, int64_t N, int64_t K, int64_t ldb, int32_t* out,
                 int num_threads);

// ---------------------------------------------------------------------------
// Weight-only GEMM (src/cpp/kernels/gemm_wo.cpp)
// ---------------------------------------------------------------------------
// out[m,n] = sum_k x[m,k] * scale[n,g(k)] * (Wq[n,k] - zp[n,g(k)]) + bias[n]
// x fp32 [M,K] contiguous; Wq int8 [N,K] (bits 8) or packed uint8 [N,ceil(K/2)]
// (bits 4); scale/zero_point [N, K/group_size]; zero_point may be null
// (symmetric). Accumulation in fp32; out fp32 [M,N] contiguous.
void gemm_weight_only(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq, int bits,
                      int64_t group_size, const float* scale, const int8_t* zero_point,
                      const float* bias, float* out, int num_threads);

// ---------------------------------------------------------------------------
// W4A8 GEMM (src/cpp/kernels/gemm_w4a8.cpp)
// ---------------------------------------------------------------------------
// int8 activations a [M, K] (row stride lda) with per-row scales a_scale [M]
// x 4-bit weights w packed [N, ceil(K/2)] (two's-complement nibbles) with
// group scales w_scale [N, K/group_size] and zero-points w_zero (same shape,
// null: symmetric). Per group the product is exact in int32,
//   P[m,n,g] = sum_{k in g} a[m,k] * (w[n,k] - w_zero[n,g]),
// then, every fp32 operation rounded on its own (no FMA):
//   acc = 0; for each group in order: acc = acc + w_scale[n,g] * float(P)
//   out[m,n] = a_scale[m] * acc (+ bias[n])
// out fp32 [M, N] contiguous. Exact int32 for K <= 65536 (the op's limit).
void gemm_w4a8(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
               const uint8_t* w, int64_t group_size, const float* w_scale, const int8_t* w_zero,
               const float* bias, float* out, int num_threads);

// The same product with the weights pre-packed ("w4panel16", derived once
// per layer by QLinear, never saved; llmeasyquant/cpu_pack.py packs it):
// ceil(N/16) panels of 16 output channels, each ceil(K/8) blocks of 64 bytes;
// byte j of block b of panel p holds, for n = 16 p + j / 4 and t = j % 4,
//   low nibble  u(n, 8 b + t),  high nibble  u(n, 8 b + 4 + t),
// u = q + 8 (offset binary, in [0, 15]); padding (n >= N or k >= K) u = 8.
// So one 64-byte load, masked and shifted, gives vpdpbusd two k4-steps of 16
// columns as its unsigned operand (gemm_w4a8_avx512.cpp).  gparams float32
// [ceil(N/16), G, 2, 16]: [p, g, 0, c] = w_scale[16 p + c, g] and
// [p, g, 1, c] = 8 + w_zero[16 p + c, g] (an exact small integer; padding
// columns 1 and 8).  Results bit-identical to gemm_w4a8.
constexpr int64_t kW4PanelCols = 16;
inline int64_t w4_panel_bytes(int64_t K) { return (K + 7) / 8 * 64; }
void gemm_w4a8_prepacked(int64_t M, int64_t N, int64_t K, const int8_t* a, int64_t lda, const float* a_scale,
                         const uint8_t* wp, const float* gparams, int64_t group_size, const float* bias, float* out,
                         int num_threads);
// Its SIMD kernel runs where has_prepacked_simd() and the groups are a
// multiple of 8; elsewhere gemm_w4a8_prepacked runs a scalar loop.

// ---------------------------------------------------------------------------
// Walsh-Hadamard transform (src/cpp/kernels/hadamard.cpp)
// ---------------------------------------------------------------------------
// Each of `rows` rows of x (n = m * p values, p a power of two, row stride
// ldx elements of type t) is mapped to
//   out[r, a*p + b] = scale * sum_{a', b'} had[a*m + a'] * S_p[b, b'] * x[r, a'*p + b']
// (S_p the natural-order Sylvester matrix: log2 p butterfly stages per block
// of p, then the m x m fp32 row-major `had` across blocks; had null means
// m = 1 and no cross-block product). fp32 arithmetic; out [rows, n]
// contiguous, type t. The tiers (scalar, AVX2) do the same fp32 operations in
// the same order, except that AVX2 fuses had * y + acc into one FMA: equal
// bit for bit when had holds +-1 (products exact), which a Hadamard matrix does.
void hadamard_transform(const void* x, FloatType t, int64_t rows, int64_t n, int64_t ldx,
                        const float* had, int64_t m, float scale, void* out, int num_threads);

// ---------------------------------------------------------------------------
// Decode-step glue (src/cpp/kernels/decode_glue.cpp): one tier for every CPU
// ---------------------------------------------------------------------------
// rows x n values of type t, rows ldx / ldr / ldg / ldu elements apart;
// outputs [rows, n] contiguous, type t. fp32 arithmetic, rounding to t where
// HF's LLaMA ops round (_reference.py has the semantics).
// sum_out = x + residual (x alone where residual is null);
// norm_out = weight * t(sum * rsqrt(mean(sum^2) + eps)).
void add_rms_norm(const void* x, const void* residual, FloatType t, int64_t rows, int64_t n, int64_t ldx,
                  int64_t ldr, const void* weight, float eps, void* sum_out, void* norm_out, int num_threads);
// out = t(silu(gate)) * up.
void silu_mul(const void* gate, const void* up, FloatType t, int64_t rows, int64_t n, int64_t ldg, int64_t ldu,
              void* out, int num_threads);
// One decode position of attention for `batch` rows: q [batch, heads * D]
// (row stride ldq), k / v [batch, kv_heads * D] (ldk, ldv); caches
// [batch, kv_heads, max_pos, D] contiguous. Writes RoPE(k) and v at `pos`,
// then out [batch, heads * D] = softmax(scale * RoPE(q) K[0..pos]^T) V[0..pos]
// per query head h over KV head h / (heads / kv_heads). cos / sin: fp32 [D],
// this position's rotate-half RoPE table (HF's, not sign-folded).
void decode_attention(const void* q, const void* k, const void* v, FloatType t, int64_t batch, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, int64_t ldq, int64_t ldk, int64_t ldv, void* k_cache,
                      void* v_cache, int64_t max_pos, int64_t pos, const float* cos, const float* sin, float scale,
                      void* out, int num_threads);

}  // namespace cpu
}  // namespace llmeq
