// AMX-INT8 u8 x s8 -> s32 GEMM on pre-packed weights, with the fused epilogue.
//
// Build: the AVX-512 flags of gemm_s8_avx512.cpp plus -mamx-tile -mamx-int8.
// Reached only on the avx512_amx tier (isa.cpp: CPUID and the Linux kernel's
// permission for tile data), and only from gemm_s8.cpp's pre-packed dispatch.
//
// Why AMX: one tdpbusd multiplies a 16 x 64 u8 tile by a 64 x 16 s8 tile into
// 16 x 16 int32 in about 16 cycles, 16x the multiply-adds per cycle of the
// 512-bit vpdpbusd, with the same exact int32 sums (no saturation, no
// rounding), so the results are bit-identical to the VNNI and scalar paths
// and the epilogue is the same code (gemm_s8_sink_avx512.h).
//
// Layout: the "panel64" weights (cpu_kernels.h) are already B tiles. A panel
// row holds one k-quad of 64 columns x 4 bytes, so the tile of columns
// [c, c + 16) and k-quads [q, q + 16) is 16 rows of 64 bytes at a row stride
// of 256 bytes, starting at byte q * 256 + c * 4 of the panel: tileloadd
// reads it in place, no repacking per call.
//
// Register blocking: 2 x 2 C tiles (32 rows x 32 columns) in tmm0-3, two A
// tiles in tmm4-5 and two B tiles in tmm6-7 -- all eight tile registers.
// Each K step of 64 bytes loads 4 KiB and issues 4 tdpbusd; A and B come from
// L2 (a row block of A and a panel of B are kept there by the loop order).
//
// Limits, decided by the dispatch: K must be a multiple of 64 (a K tail would
// need tiles of another shape, and every tile register is in use; LLM widths
// are multiples of 64), and M at least kAmxMinRows of gemm_s8.cpp (below, the
// 16-row tiles compute mostly padding and the VNNI broadcast kernel is faster). A row
// block that ends inside a 32-row group is copied into a zero-padded scratch
// buffer: tile loads of rows past M would read outside A.
//
// Internal linkage for everything but the entry point (see thread_buffer.h).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "amx_tiles.h"
#include "gemm_s8_sink_avx512.h"
#include "llmeq/cpu_kernels.h"
#include "thread_buffer.h"

namespace llmeq {
namespace cpu {
namespace {

constexpr int64_t kPanel = kS8PanelCols;  // 64 columns per packed panel
constexpr int64_t kPanelRowBytes = kPanel * 4;  // one k-quad of a panel
constexpr int64_t kTileK = 64;            // bytes of K per A tile row
constexpr int64_t kBlockRows = 32;        // 2 A tiles of 16 rows
constexpr int64_t kBlockCols = 32;        // 2 B tiles of 16 columns

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// A finished 32 x 32 int32 block (row stride 32) waiting for the epilogue:
// rows [m0, m0 + rows), columns [n0, n0 + ncols) of the output.
struct Pending {
  const int32_t* c = nullptr;
  int64_t m0 = 0, rows = 0, n0 = 0;
  __mmask16 lo = 0, hi = 0;  // valid columns of each 16-column half
  int64_t done = 0;          // rows already sent to the sink
};

// Rows [p.done, p.done + n) of a pending block to the sink.
inline void drain(const Sink& sink, Pending& p, int64_t n) {
  const int64_t r_end = p.done + n < p.rows ? p.done + n : p.rows;
  for (int64_t r = p.done; r < r_end; ++r) {
    sink_row(sink, p.m0 + r, p.n0, _mm512_loadu_si512(p.c + r * kBlockCols), p.lo);
    if (p.hi != 0) sink_row(sink, p.m0 + r, p.n0 + 16, _mm512_loadu_si512(p.c + r * kBlockCols + 16), p.hi);
  }
  p.done = r_end;
}

// C[32 x 32] (int32, row stride 32) = A[32 rows, K] (stride lda) x the 32
// panel columns starting at b (panel base + column offset * 4).
//
// The epilogue of the previous block (`prev`) runs inside this block's K
// loop, a few rows per K step: tdpbusd executes in the AMX unit while the
// AVX-512 ports convert, scale and store, so the two overlap instead of
// taking turns. Measured, 1 thread, 512 x 1536 x 576: the epilogue run after
// each block cost as much as the tile products themselves.
inline void block_32x32(const uint8_t* a, int64_t lda, const uint8_t* b, int64_t K, int32_t* c,
                        const Sink& sink, Pending& prev) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const uint8_t* a1 = a + 16 * lda;
  const int64_t steps = K / kTileK;
  const int64_t per_step = (prev.rows - prev.done + steps - 1) / steps;
  for (int64_t k = 0; k < K; k += kTileK) {
    const uint8_t* bk = b + (k / 4) * kPanelRowBytes;
    _tile_loadd(4, a + k, lda);
    _tile_loadd(5, a1 + k, lda);
    _tile_loadd(6, bk, kPanelRowBytes);
    _tile_loadd(7, bk + 64, kPanelRowBytes);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
    if (prev.done < prev.rows) drain(sink, prev, per_step);
  }
  _tile_stored(0, c, kBlockCols * 4);
  _tile_stored(1, c + 16, kBlockCols * 4);
  _tile_stored(2, c + 16 * kBlockCols, kBlockCols * 4);
  _tile_stored(3, c + 16 * kBlockCols + 16, kBlockCols * 4);
}

// Half the 2 MiB L2 of the cores AMX comes on (Sapphire / Granite Rapids):
// the budget of each operand a thread keeps in L2 -- a row block of A while
// it walks the column units, or its span of weights when it walks them row
// group by row group (measured, 1 thread, 2048 x 576 x 576: 1915 -> 2227
// GOP/s with the rows outside; 2 threads within the noise).
constexpr int64_t kL2Budget = int64_t{1} << 20;

// Rows per block of A kept in L2 (whole 32-row groups).
inline int64_t row_block(int64_t K) {
  const int64_t rows = kL2Budget / imax(K, 1) / kBlockRows * kBlockRows;
  return imin(imax(rows, kBlockRows), 1024);
}

void prepacked_gemm_amx(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                        const uint8_t* B, const Sink& sink, int nt) {
  const int64_t pstride = s8_panel_bytes(K);
  const int64_t mb = row_block(K);
  const int64_t mblocks = (M + mb - 1) / mb;
  const int64_t cunits = (N + kBlockCols - 1) / kBlockCols;  // 32-column halves of panels
  const int64_t units = mblocks * cunits;
  if (M * N * K < (int64_t{1} << 18)) nt = 1;
  if (nt > units) nt = static_cast<int>(units);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const TileScope tiles;
    static thread_local ThreadBuffer cbuf, abuf;
    // Two block buffers: one being filled by the tiles, the other (the
    // previous block) drained by the epilogue meanwhile.
    int32_t* cb = cbuf.get<int32_t>(2 * kBlockRows * kBlockCols);
    int flip = 0;
    Pending prev;
    uint8_t* pad = abuf.get<uint8_t>(kBlockRows * K);
    int64_t padded_m0 = -1;  // the rows pad holds (one tail group per call)
    // One 32 x 32 block: rows [m0, min(m0 + 32, m_end)), column unit cu.
    auto block = [&](int64_t m0, int64_t m_end, int64_t cu) {
      const int64_t n0 = cu * kBlockCols, ncols = imin(kBlockCols, N - n0);
      const uint8_t* b = B + (n0 / kPanel) * pstride + (n0 % kPanel) * 4;
      const int64_t rows = imin(kBlockRows, m_end - m0);
      const uint8_t* a = A + m0 * lda;
      int64_t a_ld = lda;
      if (rows < kBlockRows) {  // the last rows of A: a zero-padded copy, made once
        if (padded_m0 != m0) {
          for (int64_t r = 0; r < rows; ++r) std::memcpy(pad + r * K, a + r * lda, K);
          std::memset(pad + rows * K, 0, (kBlockRows - rows) * K);
          padded_m0 = m0;
        }
        a = pad;
        a_ld = K;
      }
      int32_t* c = cb + flip * kBlockRows * kBlockCols;
      block_32x32(a, a_ld, b, K, c, sink, prev);
      drain(sink, prev, kBlockRows);  // whatever the K loop did not reach
      prev.c = c;
      prev.m0 = m0;
      prev.rows = rows;
      prev.n0 = n0;
      prev.lo = tail_mask16(ncols);
      prev.hi = tail_mask16(imax(ncols - 16, 0));
      prev.done = 0;
      flip ^= 1;
    };
    // The thread's units in row-block-major order, taken a row block at a
    // time (its span of column units there). Where the span's weights fit
    // in L2 (kL2Budget), the row groups go outside and the column units
    // inside: B is re-read from L2 and the output is written along its rows
    // (the prefetchers follow row streams; a 32-column strip down the rows
    // is one RFO miss after another). Otherwise each column unit goes down
    // the row block, re-reading its 32 columns of B from L2 and A from L2.
    for (int64_t u = units * t / T, u1 = units * (t + 1) / T; u < u1;) {
      const int64_t rb = u / cunits, ub = imin(u1, (rb + 1) * cunits);
      const int64_t cu0 = u % cunits, cu1 = cu0 + (ub - u);
      const int64_t m_begin = rb * mb, m_end = imin(M, (rb + 1) * mb);
      if ((cu1 - cu0) * kBlockCols * K <= kL2Budget) {
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kBlockRows)
          for (int64_t cu = cu0; cu < cu1; ++cu) block(m0, m_end, cu);
      } else {
        for (int64_t cu = cu0; cu < cu1; ++cu)
          for (int64_t m0 = m_begin; m0 < m_end; m0 += kBlockRows) block(m0, m_end, cu);
      }
      u = ub;
    }
    drain(sink, prev, kBlockRows);
  }
}

}  // namespace

namespace detail {

void gemm_u8s8_prepacked_amx(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda,
                             const int8_t* Bp, int32_t* C, int64_t ldc, const GemmEpilogue* ep,
                             int num_threads) {
  const Sink sink{C, ldc, ep};
  prepacked_gemm_amx(M, N, K, A, lda, reinterpret_cast<const uint8_t*>(Bp), sink, num_threads);
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
