// Instruction peaks of the AVX-512 tiers (bench_kernels --only peak): what the
// avx512_vnni and avx512_amx int8 GEMMs' efficiency is measured against.
//
// Build: the AVX-512 flags plus -mamx-tile -mamx-int8 (x86-64 only;
// bench_kernels calls each function only where the tier was detected, and the
// AMX one after isa.cpp has asked Linux for tile-data permission).
//
//  * vpdpbusd: 12 independent zmm accumulator chains on register operands
//    (64 multiply-adds each), the ceiling of the VNNI broadcast kernel.
//  * tdpbusd: 4 independent C tiles from two resident A and B tiles (16 x 16
//    x 64 = 16384 multiply-adds each), the ceiling of gemm_s8_amx.cpp's 2 x 2
//    block with no loads.
// Each returns multiply-adds per second on the calling thread.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstring>

#include "../../src/cpp/kernels/amx_tiles.h"

namespace peak {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

double vnni_int8_macs_per_s(long reps) {
  long n = reps;
  const auto t0 = std::chrono::steady_clock::now();
  // Fixed registers in inline asm: no spills, no copies (see peak_avx2.cpp).
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm13, %%zmm13, %%zmm13\n\t"
      "vpabsb %%zmm13, %%zmm14\n\t"
      "1:\n\t"
      "vpdpbusd %%zmm13, %%zmm14, %%zmm0\n\tvpdpbusd %%zmm13, %%zmm14, %%zmm1\n\t"
      "vpdpbusd %%zmm13, %%zmm14, %%zmm2\n\tvpdpbusd %%zmm13, %%zmm14, %%zmm3\n\t"
      "vpdpbusd %%zmm13, %%zmm14, %%zmm4\n\tvpdpbusd %%zmm13, %%zmm14, %%zmm5\n\t"
      "vpdpbusd %%zmm13, %%zmm14, %%zmm6\n\tvpdpbusd %%zmm13, %%zmm14, %%zmm7\n\t"
      "vpdpbusd %%zmm13, %%zmm14, %%zmm8\n\tvpdpbusd %%zmm13, %%zmm14, %%zmm9\n\t"
      "vpdpbusd %%zmm13, %%zmm14, %%zmm10\n\tvpdpbusd %%zmm13, %%zmm14, %%zmm11\n\t"
      "dec %[n]\n\tjnz 1b\n\t"
      : [n] "+r"(n)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm13", "xmm14", "cc");
  return 12.0 * 64.0 * static_cast<double>(reps) / seconds_since(t0);
}

double amx_int8_macs_per_s(long reps) {
  const llmeq::cpu::TileScope tiles;  // 8 tiles of 16 rows x 64 bytes, as the kernel uses them
  alignas(64) static thread_local uint8_t data[16 * 64];
  std::memset(data, 1, sizeof(data));
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, data, 64);
  _tile_loadd(5, data, 64);
  _tile_loadd(6, data, 64);
  _tile_loadd(7, data, 64);
  const long iters = reps / 16;  // each tdpbusd is ~16 vpdpbusd's worth of time
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  const double s = seconds_since(t0);
  _tile_stored(0, data, 64);  // keep the chain observable
  return 4.0 * 16384.0 * static_cast<double>(iters) / s;
}

}  // namespace peak
