// Arm weight-only GEMM (both Arm tiers): fp32 x int8 / packed 4-, 3-, 2-bit
// group-wise weights on AArch64 AdvSIMD.
//
// Build: baseline ARMv8-A flags, -ffp-contract=off (aarch64 only).
//
// out[m, n] = sum_k x[m, k] * (s[n, k/g] * float(q[n, k] - z[n, k/g]))  (+ bias[n])
//
// Bit-exact against gemm_wo_scalar (gemm_wo.cpp), not only within a
// tolerance: the scalar loop fixes the fp32 operations and their order for
// each output, and this kernel performs exactly those, for every output:
//     w   = s * float(q - z)        (q - z in int32: exact; float(): exact,
//                                    |q - z| <= 255)
//     p   = x[m, k] * w             (one rounding)
//     acc = acc + p                 (one rounding, k = 0, 1, ..., K - 1 in order)
//     out = acc + bias[n]           (when there is a bias)
// starting from acc = +0.0f.  To keep that order the vectors run across
// *weight rows*, not along K: the 4 lanes of a vector are 4 outputs
// (n0 .. n0 + 3) of one x row, and each lane's accumulator sees its k in
// order, one fmul + one fadd per k (never an fmla: -ffp-contract=off keeps
// vmulq / vaddq separate, and there are no partial sums to re-associate).
// IEEE multiplication is commutative, so s * float(q) and x * w computed as
// vmulq(sv, q) / vmulq_n(w, x) give the scalar path's bits.  The price is
// one fmul + one fadd per multiply-add instead of one fmla and no split
// accumulators: this tier is exact first (it is checked under qemu, not yet
// timed on Arm hardware).
//
// Layout in registers: a tile is kNV x 4 weight rows x MR x rows (MR <= 4).
// A 16-value chunk (on the fixed grid k = 0, 16, 32, ...) of each of the 4
// rows of a vector is decoded to int8 lanes (8-bit: the bytes; 4-bit:
// sign-extended nibbles, element 2i = low nibble; 3-, 2-bit: the offset
// codes u = q - qmin, and the offset joins the zero-point), then transposed
// with two zip levels:
//     T[c] (int8x16), c = 0..3:  byte 4 * kk' + r = value k + 4c + kk' of row r
// so each k's 4 codes (one per row) are one 32-bit group, widened by sxtl to
// an int32x4 (lane r = row n0 + r).  Scale and zero-point are per lane (one
// gather of 4 values per group).  Groups of any size that divides K are
// handled: a chunk that straddles a group boundary (or the end of K) is
// decoded once per group and only its values inside the group are used.
//
// Internal linkage only and no std:: templates that emit code (see
// gemm_s8_avx512.cpp).
#include <arm_neon.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <utility>  // std::integer_sequence (compile time only)

#include "llmeq/cpu_kernels.h"

namespace llmeq {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

constexpr int kNV = 2;          // int32x4 vectors of weight rows per tile
constexpr int kNR = 4 * kNV;    // weight rows per tile
constexpr int kMR = 4;          // x rows per tile

struct WoArgs {
  int64_t M, N, K;
  const float* x;    // [M, K]
  const uint8_t* W;  // row n at W + n * rb
  int64_t rb;        // packed row bytes
  int64_t g, G;      // group size, groups per row
  const float* scale;
  const int8_t* zp;
  const float* bias;
  float* out;
};

// Offset subtracted with the zero-point: 3- and 2-bit chunks decode to the
// offset code u = q - qmin, so q - z = u - (z - qmin) = u - (z + 2^(b-1)).
template <int BITS> constexpr int kQOff = BITS >= 4 ? 0 : (1 << (BITS - 1));
template <int BITS, bool ZP> constexpr bool kSub = ZP || BITS < 4;

// `need` bytes at p, zero-filled past `avail` (the chunk that runs past the
// end of a row: 8- and 4-bit rows are unpadded, 2/3-bit rows are padded to 8
// values only, and the last row may end the allocation).
inline uint8x16_t load_bytes(const uint8_t* p, int64_t need, int64_t avail) {
  uint8_t buf[16] = {0};
  std::memcpy(buf, p, static_cast<size_t>(need < avail ? need : avail));
  return vld1q_u8(buf);
}

// The 16 values k .. k + 15 (k on the 16-grid) of one row as int8 lanes.
template <int BITS>
inline int8x16_t decode16(const uint8_t* row, int64_t k, int64_t rb) {
  if constexpr (BITS == 8) {
    if (k + 16 <= rb) return vld1q_s8(reinterpret_cast<const int8_t*>(row + k));
    return vreinterpretq_s8_u8(load_bytes(row + k, 16, rb - k));
  } else if constexpr (BITS == 4) {
    const int64_t o = k >> 1;
    const int8x8_t b = o + 8 <= rb ? vld1_s8(reinterpret_cast<const int8_t*>(row + o))
                                   : vget_low_s8(vreinterpretq_s8_u8(load_bytes(row + o, 8, rb - o)));
    const int8x8_t lo = vshr_n_s8(vshl_n_s8(b, 4), 4);  // element 2i: sign-extended low nibble
    const int8x8_t hi = vshr_n_s8(b, 4);                // element 2i + 1: high nibble
    return vcombine_s8(vzip1_s8(lo, hi), vzip2_s8(lo, hi));
  } else if constexpr (BITS == 2) {
    // value l: byte l / 4, bits 2 (l % 4) .. + 1
    const int64_t o = k >> 2;
    const uint8x16_t b = load_bytes(row + o, 4, rb - o);
    static const uint8_t idx[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    static const int8_t sh[16] = {0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6};
    const uint8x16_t t = vshlq_u8(vqtbl1q_u8(b, vld1q_u8(idx)), vld1q_s8(sh));
    return vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(3)));
  } else {
    static_assert(BITS == 3, "bits");
    // value l (of 16): stream bits 3l .. 3l + 2, inside the 16-bit word of
    // bytes (3l / 8, 3l / 8 + 1), shifted right by 3l % 8.
    const int64_t o = (k >> 3) * 3;
    const uint8x16_t b = load_bytes(row + o, 6, rb - o);
    static const uint8_t idx[2][16] = {{0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3},
                                       {3, 4, 3, 4, 3, 4, 4, 5, 4, 5, 4, 5, 5, 6, 5, 6}};
    static const int16_t sh[8] = {0, -3, -6, -1, -4, -7, -2, -5};
    const int16x8_t shv = vld1q_s16(sh);
    const uint16x8_t w0 = vshlq_u16(vreinterpretq_u16_u8(vqtbl1q_u8(b, vld1q_u8(idx[0]))), shv);
    const uint16x8_t w1 = vshlq_u16(vreinterpretq_u16_u8(vqtbl1q_u8(b, vld1q_u8(idx[1]))), shv);
    const uint8x16_t u = vcombine_u8(vmovn_u16(w0), vmovn_u16(w1));
    return vreinterpretq_s8_u8(vandq_u8(u, vdupq_n_u8(7)));
  }
}

// 4 rows' chunks -> T[0..3]: T[c] byte 4 * j + r = value 4c + j of row r.
inline void transpose4(const int8x16_t r[4], int8x16_t T[4]) {
  const int8x16_t a_lo = vzip1q_s8(r[0], r[1]), a_hi = vzip2q_s8(r[0], r[1]);
  const int8x16_t b_lo = vzip1q_s8(r[2], r[3]), b_hi = vzip2q_s8(r[2], r[3]);
  T[0] = vreinterpretq_s8_s16(vzip1q_s16(vreinterpretq_s16_s8(a_lo), vreinterpretq_s16_s8(b_lo)));
  T[1] = vreinterpretq_s8_s16(vzip2q_s16(vreinterpretq_s16_s8(a_lo), vreinterpretq_s16_s8(b_lo)));
  T[2] = vreinterpretq_s8_s16(vzip1q_s16(vreinterpretq_s16_s8(a_hi), vreinterpretq_s16_s8(b_hi)));
  T[3] = vreinterpretq_s8_s16(vzip2q_s16(vreinterpretq_s16_s8(a_hi), vreinterpretq_s16_s8(b_hi)));
}

// Value j (0..3) of a T vector: the 4 rows' codes as int32 lanes.
template <int J>
inline int32x4_t codes_at(int8x16_t t) {
  if constexpr (J < 2) {
    const int16x8_t h = vmovl_s8(vget_low_s8(t));
    return J == 0 ? vmovl_s16(vget_low_s16(h)) : vmovl_high_s16(h);
  } else {
    const int16x8_t h = vmovl_high_s8(t);
    return J == 2 ? vmovl_s16(vget_low_s16(h)) : vmovl_high_s16(h);
  }
}

// MR x kNR tile, all of K.  Past-the-end weight rows repeat the last row;
// their results are dropped.
template <int BITS, int MR, bool ZP>
void tile(const WoArgs& a, int64_t m0, int64_t n0) {
  const int64_t nvalid = a.N - n0;
  const uint8_t* w[kNR];
  int64_t rows[kNR];
  for (int r = 0; r < kNR; ++r) {
    rows[r] = n0 + (r < nvalid ? r : nvalid - 1);
    w[r] = a.W + rows[r] * a.rb;
  }
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.K;
  float32x4_t acc[MR][kNV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < kNV; ++v) acc[i][v] = vdupq_n_f32(0.0f);  // +0.0f, as the scalar acc

  for (int64_t gi = 0; gi * a.g < a.K; ++gi) {
    const int64_t gs = gi * a.g, ge = imin(gs + a.g, a.K);
    float32x4_t sv[kNV];
    int32x4_t zv[kNV];
    for (int v = 0; v < kNV; ++v) {
      float s4[4];
      int32_t z4[4];
      for (int r = 0; r < 4; ++r) {
        const int64_t idx = rows[4 * v + r] * a.G + gi;
        s4[r] = a.scale[idx];
        z4[r] = (ZP ? a.zp[idx] : 0) + kQOff<BITS>;
      }
      sv[v] = vld1q_f32(s4);
      zv[v] = vld1q_s32(z4);
    }
    for (int64_t c = gs - gs % 16; c < ge; c += 16) {
      const int lo = static_cast<int>(imax(c, gs) - c), hi = static_cast<int>(imin(c + 16, ge) - c);
      int8x16_t T[kNV][4];
      for (int v = 0; v < kNV; ++v) {
        int8x16_t r4[4];
        for (int r = 0; r < 4; ++r) r4[r] = decode16<BITS>(w[4 * v + r], c, a.rb);
        transpose4(r4, T[v]);
      }
      // Value kk of the chunk (k = c + kk), in order; FULL: all 16 valid.
      auto step = [&]<int KK, bool FULL>() {
        if (!FULL && (KK < lo || KK >= hi)) return;
        for (int v = 0; v < kNV; ++v) {
          int32x4_t q = codes_at<KK % 4>(T[v][KK / 4]);
          if constexpr (kSub<BITS, ZP>) q = vsubq_s32(q, zv[v]);
          const float32x4_t wv = vmulq_f32(sv[v], vcvtq_f32_s32(q));  // s * float(q - z)
          for (int i = 0; i < MR; ++i)
            acc[i][v] = vaddq_f32(acc[i][v], vmulq_n_f32(wv, xr[i][c + KK]));  // acc + x * w
        }
      };
      auto chunk = [&]<bool FULL, int... KK>(std::integer_sequence<int, KK...>) {
        (step.template operator()<KK, FULL>(), ...);
      };
      if (lo == 0 && hi == 16)
        chunk.template operator()<true>(std::make_integer_sequence<int, 16>{});
      else
        chunk.template operator()<false>(std::make_integer_sequence<int, 16>{});
    }
  }

  const int64_t nn = imin(nvalid, kNR);
  for (int i = 0; i < MR; ++i) {
    float r[kNR];
    for (int v = 0; v < kNV; ++v) vst1q_f32(r + 4 * v, acc[i][v]);
    float* o = a.out + (m0 + i) * a.N + n0;
    for (int64_t j = 0; j < nn; ++j) o[j] = a.bias != nullptr ? r[j] + a.bias[n0 + j] : r[j];
  }
}

template <int BITS, bool ZP>
void run(const WoArgs& a, int nt) {
  const int64_t tiles = (a.N + kNR - 1) / kNR;
  const bool par = nt > 1 && a.M * a.N * a.K >= (int64_t{1} << 16);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kNR;
    int64_t m = 0;
    for (; m + kMR <= a.M; m += kMR) tile<BITS, kMR, ZP>(a, m, n0);
    switch (a.M - m) {
      case 3: tile<BITS, 3, ZP>(a, m, n0); break;
      case 2: tile<BITS, 2, ZP>(a, m, n0); break;
      case 1: tile<BITS, 1, ZP>(a, m, n0); break;
      default: break;
    }
  }
}

template <int BITS>
void run_bits(const WoArgs& a, int nt) {
  if (a.zp != nullptr) run<BITS, true>(a, nt);
  else run<BITS, false>(a, nt);
}

}  // namespace

namespace detail {

bool gemm_weight_only_neon(int64_t M, int64_t N, int64_t K, const float* x, const void* Wq,
                           int bits, int64_t group_size, const float* scale,
                           const int8_t* zero_point, const float* bias, float* out,
                           int num_threads) {
  if (bits != 8 && bits != 4 && bits != 3 && bits != 2) return false;
  const int64_t rb = bits == 8 ? K : bits == 4 ? (K + 1) / 2 : (K + 7) / 8 * bits;
  const WoArgs a{M, N, K, x, static_cast<const uint8_t*>(Wq), rb, group_size,
                 K / group_size, scale, zero_point, bias, out};
  switch (bits) {
    case 8: run_bits<8>(a, num_threads); break;
    case 4: run_bits<4>(a, num_threads); break;
    case 3: run_bits<3>(a, num_threads); break;
    default: run_bits<2>(a, num_threads); break;
  }
  return true;
}

}  // namespace detail
}  // namespace cpu
}  // namespace llmeq
