// Warp-level tensor-core fragment layouts and the shared-memory tile
// addressing of the CUDA GEMM kernels, as plain __host__ __device__ index
// math. The kernels in src/cuda use exactly these functions, and
// tests/test_mma_layout.py checks them on the CPU (through llmeasyquant._C)
// against the PTX ISA fragment tables and a CPU model of ldmatrix, so that a
// wrong lane/element mapping fails without a GPU.
//
// Notation of the PTX ISA: lane = threadIdx.x % 32, group = lane >> 2
// ("groupID"), tig = lane & 3 ("threadID_in_group").
#pragma once

#if defined(__CUDACC__)
#define LLMEQ_LHD __host__ __device__ __forceinline__
#else
#define LLMEQ_LHD static inline
#endif

namespace llmeq {
namespace mma {

struct RC {
  int row, col;
};

// ---- mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 ----------------------
// A: 16x32 s8, four .b32 registers = 16 elements a0..a15 per lane.
LLMEQ_LHD RC s8_a(int lane, int i) {
  const int group = lane >> 2, tig = lane & 3;
  const int row = group + (((i >> 2) & 1) ? 8 : 0);
  const int col = tig * 4 + (i & 3) + (i >= 8 ? 16 : 0);
  return {row, col};
}
// B: 32x8 s8 (row = k, col = n), two .b32 registers = b0..b7.
LLMEQ_LHD RC s8_b(int lane, int i) {
  const int group = lane >> 2, tig = lane & 3;
  return {tig * 4 + (i & 3) + (i >= 4 ? 16 : 0), group};
}
// C/D: 16x8 s32 (or f32 for the f16 shape below), c0..c3.
LLMEQ_LHD RC acc_c(int lane, int i) {
  const int group = lane >> 2, tig = lane & 3;
  return {group + (i >= 2 ? 8 : 0), tig * 2 + (i & 1)};
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 -------
// A: 16x16, four .b32 registers = a0..a7 (two 16-bit halves each).
LLMEQ_LHD RC h_a(int lane, int i) {
  const int group = lane >> 2, tig = lane & 3;
  const int row = group + ((i >> 1) & 1 ? 8 : 0);
  const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
  return {row, col};
}
// B: 16x8 (row = k, col = n), two registers = b0..b3.
LLMEQ_LHD RC h_b(int lane, int i) {
  const int group = lane >> 2, tig = lane & 3;
  return {tig * 2 + (i & 1) + (i >= 2 ? 8 : 0), group};
}

// ---- shared-memory tiles ----------------------------------------------------
// Tiles are stored as rows of 64 bytes (4 chunks of 16 bytes): 64 int8 or 32
// 16-bit values of K per row. ldmatrix reads one 16-byte chunk from each of 8
// consecutive rows per phase; without a swizzle rows r and r+2 share banks
// (a 128-byte bank line holds 2 rows). XOR-ing the chunk index with bits 1..2
// of the row spreads the 8 rows over all 8 16-byte bank groups.
constexpr int kRowBytes = 64;
LLMEQ_LHD int swz64(int row, int chunk) { return row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4); }

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l supplies the address of
// row (l & 7) of matrix (l >> 3); register j of every lane receives matrix j,
// lane l getting row l >> 2, bytes 4*(l & 3) .. +3.
//
// s8 A fragment of m16 tile, k32 step ks (ks = 0/1 within the 64-byte row):
// matrices (rows 0-7, bytes 0-15), (rows 8-15, 0-15), (rows 0-7, 16-31),
// (rows 8-15, 16-31) give a0-3, a4-7, a8-11, a12-15.
LLMEQ_LHD RC ldsm_s8_a(int lane, int ks) { return {lane & 15, ks * 2 + (lane >> 4)}; }
// s8 B fragments of two n8 tiles (16 weight rows), k32 step ks: matrices
// (n 0-7, bytes 0-15), (n 0-7, 16-31), (n 8-15, 0-15), (n 8-15, 16-31) give
// b[0][0], b[0][1], b[1][0], b[1][1].
LLMEQ_LHD RC ldsm_s8_b(int lane, int ks) { return {(lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)}; }
// 16-bit A fragment of m16 tile, k16 step ks (ks = 0/1 within the 32-value
// row): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15) give a0a1, a2a3, a4a5, a6a7.
LLMEQ_LHD RC ldsm_h_a(int lane, int ks) { return {lane & 15, ks * 2 + (lane >> 4)}; }

// ---- 128-byte rows (the W4A16 panel kernel's activation tile) --------------
// Rows of 64 16-bit values of K (8 chunks of 16 bytes): a bank line is one
// row, so ldmatrix's 8 rows of one phase all hit the same banks unless the
// chunk is XOR-ed with the row's low 3 bits. ldsm_h_a above gives the chunk
// for k16 steps ks = 0..3 of such a row.
constexpr int kRowBytes128 = 128;
LLMEQ_LHD int swz128(int row, int chunk) { return row * kRowBytes128 + ((chunk ^ (row & 7)) << 4); }

// ---- 4-bit weight panels (gemm_w4_panel.cu) ---------------------------------
// The canonical int4 weight [N, K] (two values per byte along K) is re-laid
// out once, at the first CUDA call of a layer (llmeasyquant/panel.py), into
// panels of 64 output channels. Panel p is K16 tiles of k16 x n64 in K order;
// a tile is 512 bytes = 32 lanes x 4 words, lane-major, so one 16-byte load
// per lane reads a tile (coalesced from global memory, conflict-free from
// shared memory) and that load already is the lane's B fragments (h_b) of the
// tile's eight n8 tiles: word w feeds n8 tiles 2w and 2w + 1. Nibble i of a
// word is element e = ((i & 1) << 1) | (i >> 2) of n8 tile 2w + ((i >> 1) & 1),
// which puts the two halves of one B register (e = 0, 1 or e = 2, 3) at
// nibbles i and i + 4, i.e. bits 4i and 4i + 16: (word >> 4i) & 0x000f000f
// ORed with a float's exponent is that register (one shift + one LOP3).
// Nibbles hold q + 8 (unsigned; q is the signed canonical value).
struct PanelSlot {
  int lane, word, nibble;
};
// (k, n) inside a k16 x n64 tile -> where the panel keeps it.
LLMEQ_LHD PanelSlot w4_panel_slot(int k, int n) {
  const int j = n >> 3, group = n & 7, kk = k & 15;
  const int tig = (kk & 7) >> 1, e = (kk & 1) | ((kk >> 3) << 1);
  const int nibble = (e >> 1) | ((j & 1) << 1) | ((e & 1) << 2);
  return {group * 4 + tig, j >> 1, nibble};
}
// The inverse: (lane, word, nibble) -> (k, n) inside the tile.
LLMEQ_LHD RC w4_panel_elem(int lane, int word, int nibble) {
  const int e = ((nibble & 1) << 1) | (nibble >> 2), j = 2 * word + ((nibble >> 1) & 1);
  const RC b = h_b(lane, e);
  return {b.row, 8 * j + b.col};
}
// 32-bit word index of (k, n) of the whole matrix in the panel tensor
// [N64 panels][K16 tiles][32 lanes][4 words].
LLMEQ_LHD long long w4_panel_word(int k, int n, int k16_tiles) {
  const PanelSlot s = w4_panel_slot(k, n);
  return ((static_cast<long long>(n >> 6) * k16_tiles + (k >> 4)) * 32 + s.lane) * 4 + s.word;
}
// Group parameters of one panel and quantization group: 128 floats,
// [2 (scale, 8 + zero-point)][8 (n & 7)][8 (n >> 3)], so that a lane's eight
// columns (n = 8j + group) are 8 consecutive floats: two 16-byte loads each.
LLMEQ_LHD int w4_panel_param(int which, int n) { return which * 64 + (n & 7) * 8 + (n >> 3); }

}  // namespace mma
}  // namespace llmeq
