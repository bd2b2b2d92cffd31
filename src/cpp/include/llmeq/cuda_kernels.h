// Torch-free CUDA kernels of LLMEasyQuant (src/cuda/*.cu): raw device
// pointers, sizes and a stream. Same semantics as the CPU kernels
// (cpu_kernels.h) and python/llmeasyquant/_reference.py. Every launcher
// returns cudaGetLastError() after its launches; the torch layer
// (src/cuda/register_cuda.cpp) turns a failure into a clear error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "llmeq/cpu_kernels.h"

namespace llmeq {
namespace cuda {

using FloatType = cpu::FloatType;

// ---- quantize.cu ------------------------------------------------------------
// Dynamic quantization of rows x K values (row stride ldx elements) in
// segments of g consecutive values (g divides K; g == K is per row): one warp
// reduces a segment and quantizes it in the same launch. write_q == false
// writes only scale/zero-point (4-bit with odd g, where a byte straddles two
// segments: quantize_with_scale then writes q).
cudaError_t quantize_segments(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, int bits,
                              bool symmetric, int64_t g, bool write_q, void* q, float* scale, int8_t* zp,
                              cudaStream_t stream);
// q from given scales: scale index = row * sstride + col / g (sstride 0: one
// scale for everything). Scale and zero-point are read on the device.
cudaError_t quantize_with_scale(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, int bits, int64_t g,
                                const float* scale, const int8_t* zp, int64_t sstride, void* q, cudaStream_t stream);
// Whole-tensor absmax/min/max in two steps (no host synchronisation):
// partials [blocks * 3], then one of the finalisers below.
int minmax_blocks(int64_t n);
cudaError_t tensor_minmax_partial(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, float* partial,
                                  int blocks, cudaStream_t stream);
cudaError_t finalize_tensor_scale(const float* partial, int blocks, int bits, bool symmetric, float* scale, int8_t* zp,
                                  cudaStream_t stream);
// Paper Algorithm 1 on the device: EMA state float[4] (absmax, min, max,
// steps) updated from the partials (if update; partial may be null when the
// input is empty), then scale/zero-point derived from the state.
cudaError_t ema_update_scale(const float* partial, int blocks, float* state, float alpha, float one_minus_alpha,
                             float eps, int bits, bool symmetric, bool update, float* scale, int8_t* zp,
                             cudaStream_t stream);
cudaError_t dequantize(const void* q, int64_t rows, int64_t K, int bits, int64_t g, const float* scale,
                       const int8_t* zp, int64_t sstride, void* out, FloatType t, cudaStream_t stream);
// Running per-channel statistics; workspace holds chunks * 3 * K floats.
int channel_stats_chunks(int64_t rows);
cudaError_t channel_stats_update(const void* x, FloatType t, int64_t rows, int64_t K, int64_t ldx, float* absmax,
                                 float* mn, float* mx, float* workspace, int chunks, cudaStream_t stream);

// ---- gemm_s8.cu -------------------------------------------------------------
enum class OutKind : int { I32 = 0, F32 = 1, BF16 = 2, F16 = 3 };

// out[m, n] = (a_scale[m] * b_scale[n]) * (acc - a_zero[m] * b_sum[n]) + bias[n]
// (float kinds), or the raw int32 accumulator (I32; the other fields unused).
struct Epilogue {
  const float* a_scale = nullptr;
  int64_t a_scale_stride = 1;  // 1 per token, 0 per tensor
  const int8_t* a_zero = nullptr;
  int64_t a_zero_stride = 1;
  const float* b_scale = nullptr;
  const int32_t* b_sum = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  int64_t ldo = 0;
  OutKind kind = OutKind::I32;
};

enum class GemmPath : int { Auto = 0, Mma = 1, Dp4a = 2 };
constexpr int kDp4aMaxM = 8;      // the dp4a GEMV takes M <= 8
constexpr int kDp4aAutoMaxM = 4;  // Auto picks it up to here (H100: wins at M = 1, loses at M = 8)

// A int8 [M, K] (row stride lda), B int8 [N, K] (ldb), exact int32
// accumulation. Needs K % 16 == 0 and 16-byte aligned rows (the torch layer
// pads otherwise). Auto: dp4a GEMV for M <= kDp4aMaxM, else mma.sync tiles
// chosen by M, split-K when the tile grid would leave SMs idle; the split-K
// partial sums go through `workspace` (gemm_s8_workspace elements of int32).
int64_t gemm_s8_workspace(int64_t M, int64_t N, int64_t K, int sm_count, GemmPath path);
cudaError_t gemm_s8(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                    const Epilogue& ep, int32_t* workspace, int sm_count, GemmPath path, cudaStream_t stream);

// Decode W8A8 in one launch: per-token quantization of x (bf16/fp16/fp32
// [M, K], row stride ldx) fused into the dp4a GEMV; bit-identical to
// quantize_segments + gemm_s8 (the epilogue's a_scale / a_zero are the
// kernel's own; ep.b_sum is needed for asymmetric activations).
// M <= kFusedMaxM, K % 16 == 0, M * K <= kFusedMaxSmem (the int8 rows live in
// dynamic shared memory; with the kernel's ~120 static bytes the total stays
// under the 48 KiB a launch gets without opting in). Compiled, not yet
// validated on a GPU.
constexpr int kFusedMaxM = 4;
constexpr int64_t kFusedMaxSmem = 47 * 1024;
bool gemv_s8_fused_supported(int64_t M, int64_t K);
cudaError_t gemv_s8_fused_quant(int64_t M, int64_t N, int64_t K, const void* x, FloatType t, int64_t ldx,
                                bool symmetric, const int8_t* B, int64_t ldb, const Epilogue& ep,
                                cudaStream_t stream);

// ---- gemm_wo.cu ---------------------------------------------------------------
// Weight-only W8A16 / W4A16: x bf16/fp16 [M, K] (row stride ldx), qw int8
// [N, K] or packed uint8 [N, K/2], scales/zero-points [N, K/g]; (q - z) is
// formed exactly in 16-bit registers, multiplied on the tensor cores with
// fp32 accumulation per group, then scaled per group in fp32.
// Auto: a GEMV (one warp per output channel, dequantize in registers, fp32
// FMA) for M <= kWoGemvMaxM; above it the caller dequantizes to x's dtype
// and uses cuBLAS (faster than the mma kernel on H100 today); Mma forces the
// tensor-core kernel (any M), Gemv the GEMV (M <= kWoGemvMaxM).
enum class WoPath : int { Auto = 0, Mma = 1, Gemv = 2, Dequant = 3 };
constexpr int kWoGemvMaxM = 8;
WoPath weight_only_path(int64_t M, WoPath requested);
bool weight_only_supported(int64_t K, int bits, int64_t g, FloatType t);
// Runs the Mma or Gemv path (as returned by weight_only_path; not Dequant).
cudaError_t weight_only_gemm(int64_t M, int64_t N, int64_t K, const void* x, FloatType t, int64_t ldx, const void* qw,
                             int bits, int64_t g, const float* scale, const int8_t* zp, const float* bias, void* out,
                             WoPath path, cudaStream_t stream);

// ---- gemm_w4_panel.cu -----------------------------------------------------------
// W4A16 on the tensor cores from the panel layout (mma_layout.h; made by
// llmeasyquant/panel.py): x bf16/fp16 [M, K] (row stride ldx, 16-byte aligned
// rows), qpanel int32 [N64][K16][32][4] with K16 = ceil(K / 64) * 4, gparams
// float32 [N64][K / g][2][8][8]; bias fp32 or null; out x's dtype [M, N].
// Takes K % 16 == 0 and g == K or g % 64 == 0. Meant for M above the GEMV's
// kWoGemvMaxM; ops.py / QLinear choose it (kPanelMaxM is an untimed guess of
// the crossover with dequantize + cuBLAS). Compiled, not yet validated on a GPU.
bool w4_panel_supported(int64_t K, int64_t g, FloatType t);
cudaError_t w4_panel_gemm(int64_t M, int64_t N, int64_t K, const void* x, FloatType t, int64_t ldx,
                          const int32_t* qpanel, const float* gparams, int64_t g, const float* bias, void* out,
                          cudaStream_t stream);

// ---- hadamard.cu ----------------------------------------------------------------
// The Walsh-Hadamard transform of cpu_kernels.h (same arguments; had is an
// m x m fp32 device matrix or null), one CTA per row with the row in shared
// memory as fp32: n <= kHadamardMaxN (128 KiB, within the opt-in limit of
// sm_80 and sm_90; llmeasyquant/ops.py runs longer rows in PyTorch).
// Compiled, not yet validated on a GPU.
constexpr int64_t kHadamardMaxN = 32768;
cudaError_t hadamard_transform(const void* x, FloatType t, int64_t rows, int64_t n, int64_t ldx, const float* had,
                               int64_t m, float scale, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace llmeq
