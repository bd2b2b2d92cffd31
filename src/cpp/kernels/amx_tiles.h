// AMX tile configuration shared by the AMX kernels and bench_kernels' AMX
// peak. Include only from files compiled with -mamx-tile (CMakeLists.txt).
//
// Internal linkage on purpose (see thread_buffer.h).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace llmeq {
namespace cpu {
namespace {

// The tile configuration of palette 1 (Intel SDM, LDTILECFG): every register
// 16 rows x 64 bytes (C tiles: 16 x 16 int32).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tile state is per thread: each OpenMP thread configures its own registers
// and releases them when done (a thread left holding tile state makes every
// later context switch save 8 KiB more).
struct TileScope {
  TileScope() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
};

}  // namespace
}  // namespace cpu
}  // namespace llmeq
