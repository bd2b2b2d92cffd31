// Instruction-mix peaks of this CPU for the AVX2 tier (bench_kernels --only peak):
// what the AVX2 int8 GEMM's efficiency is measured against.
//
// Build: -mavx2 -mfma (x86-64 only; bench_kernels calls it only on an AVX2 CPU).
//
//  * exact int8: the panel micro-kernel's own loop body (gemm_s8_avx2.cpp
//    micro6) on L1-resident data: 2 panel loads, 6 dword broadcasts, 12
//    vpmaddwd + 12 vpaddd per 192 u8 x s8 products.  This is the ceiling of
//    an exact 8-bit product on AVX2 (no saturating vpmaddubsw).
//  * vpmaddubsw + vpmaddwd(ones) + vpaddd: what fbgemm's AVX2 path issues per
//    32 products (exact only for 7-bit activations, torch's reduce_range).
//  * fp32: 12 independent vfmadd231ps chains (what fp32 BLAS peaks at).
// Each returns multiply-adds per second on the calling thread.
#include <immintrin.h>

#include <chrono>
#include <cstdint>

namespace peak {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

alignas(64) int32_t g_panel[256 * 16];
alignas(64) int16_t g_a[6 * 512];

}  // namespace

// The loop bodies are inline asm with fixed registers, so the compiler can
// neither spill the 12 accumulators nor add register copies: these are
// ceilings of the instruction mix, not of a compiler's schedule.
#define MADD_ACC(b, acc) "vpmaddwd %%" b ", %%ymm14, %%ymm15\n\tvpaddd %%ymm15, %%" acc ", %%" acc "\n\t"
#define BCAST_ROW(off, acc0, acc1) "vpbroadcastd " off "(%[a]), %%ymm14\n\t" MADD_ACC("ymm12", acc0) MADD_ACC("ymm13", acc1)

double exact_int8_macs_per_s(long reps) {
  for (int i = 0; i < 256 * 16; ++i) g_panel[i] = (i * 7) & 0x7f7f;
  for (int i = 0; i < 6 * 512; ++i) g_a[i] = static_cast<int16_t>(i & 255);
  const auto t0 = std::chrono::steady_clock::now();
  for (long r = 0; r < reps; ++r) {
    for (int p = 0; p < 256; ++p) {
      const int32_t* a = reinterpret_cast<const int32_t*>(g_a) + p;  // rows 1024 bytes apart
      __asm__ volatile(
          "vmovdqa (%[b]), %%ymm12\n\tvmovdqa 32(%[b]), %%ymm13\n\t"
          BCAST_ROW("0", "ymm0", "ymm1") BCAST_ROW("1024", "ymm2", "ymm3") BCAST_ROW("2048", "ymm4", "ymm5")
          BCAST_ROW("3072", "ymm6", "ymm7") BCAST_ROW("4096", "ymm8", "ymm9") BCAST_ROW("5120", "ymm10", "ymm11")
          :
          : [a] "r"(a), [b] "r"(g_panel + p * 16)
          : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
            "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    }
  }
  return reps * 256.0 * 6 * 16 * 2 / seconds_since(t0);
}

#define UBS(acc) "vpmaddubsw %%ymm13, %%ymm12, %%ymm15\n\tvpmaddwd %%ymm14, %%ymm15, %%ymm15\n\t" \
                 "vpaddd %%ymm15, %%" acc ", %%" acc "\n\t"

double maddubs_int8_macs_per_s(long reps) {
  const auto t0 = std::chrono::steady_clock::now();
  for (long r = 0; r < reps * 256; ++r) {
    __asm__ volatile(
        "vpcmpeqw %%ymm14, %%ymm14, %%ymm14\n\tvpsrlw $15, %%ymm14, %%ymm14\n\t"  // ones (int16)
        UBS("ymm0") UBS("ymm1") UBS("ymm2") UBS("ymm3") UBS("ymm4") UBS("ymm5")
        UBS("ymm6") UBS("ymm7") UBS("ymm8") UBS("ymm9") UBS("ymm10") UBS("ymm11")
        :
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "xmm15");
  }
  return reps * 256.0 * 12 * 32 / seconds_since(t0);
}

#define FMA(acc) "vfmadd231ps %%ymm12, %%ymm13, %%" acc "\n\t"

#define ZERO(r) "vxorps %%" r ", %%" r ", %%" r "\n\t"

// The operands are zeroed (zero idioms, no execution port): left as whatever
// the registers held, they can be denormal, and Intel cores take a microcode
// assist per denormal FMA (0.6 instead of ~120 GFLOP/s on a Xeon).
double fp32_fma_macs_per_s(long reps) {
  __asm__ volatile(ZERO("ymm0") ZERO("ymm1") ZERO("ymm2") ZERO("ymm3") ZERO("ymm4") ZERO("ymm5")
                   ZERO("ymm6") ZERO("ymm7") ZERO("ymm8") ZERO("ymm9") ZERO("ymm10") ZERO("ymm11")
                   :
                   :
                   : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
                     "xmm10", "xmm11");
  const auto t0 = std::chrono::steady_clock::now();
  for (long r = 0; r < reps * 256; ++r) {
    __asm__ volatile(ZERO("ymm12") ZERO("ymm13") FMA("ymm0") FMA("ymm1") FMA("ymm2") FMA("ymm3") FMA("ymm4") FMA("ymm5")
                     FMA("ymm6") FMA("ymm7") FMA("ymm8") FMA("ymm9") FMA("ymm10") FMA("ymm11")
                     :
                     :
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
                       "xmm10", "xmm11", "xmm12", "xmm13");
  }
  return reps * 256.0 * 12 * 8 / seconds_since(t0);
}

#undef MADD_ACC
#undef BCAST_ROW
#undef UBS
#undef FMA
#undef ZERO

}  // namespace peak
