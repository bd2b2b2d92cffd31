// Argument checks shared by the CPU and CUDA op implementations. Every message
// says which op, what was expected and what came. The fake implementations in
// python/llmeasyquant/_fake.py mirror these for traced code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>

#include "llmeq/cpu_kernels.h"
#include "llmeq/quant_math.h"

namespace llmeq {

// Error messages are built as strings without std::ostream number
// formatting: with toolchains that link parts of libstdc++ statically into
// the extension (GCC 13 at /opt/gcc on the lent H100 image), formatting a
// number through the extension's own copy of num_put crashed the process
// (segfault in ostream::_M_insert<long>) instead of raising the error.
inline std::string to_text(const char* v) { return v; }
inline std::string to_text(const std::string& v) { return v; }
inline std::string to_text(char v) { return std::string(1, v); }
inline std::string to_text(bool v) { return v ? "true" : "false"; }
inline std::string to_text(at::ScalarType v) { return c10::toString(v); }
inline std::string to_text(const c10::Device& v) { return v.str(); }
inline std::string to_text(at::IntArrayRef v) {
  std::string r = "[";
  for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + std::to_string(v[i]);
  return r + "]";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string to_text(T v) {
  return std::to_string(v);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
std::string to_text(T v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(v));
  return buf;
}
template <typename... Args>
std::string msg(const Args&... args) {
  std::string r;
  (r.append(to_text(args)), ...);
  return r;
}

inline std::string shape_str(const at::Tensor& t) { return to_text(t.sizes()); }

// 2- and 3-bit packed values have CPU kernels only; on CUDA, the Python ops
// (llmeasyquant/ops.py) run them in PyTorch or unpack them for the 8-bit kernels.
inline void check_bits(const char* op, int64_t bits, bool cpu) {
  if (cpu) {
    TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8,
                      msg(op, ": unsupported bits=", bits, "; supported: 2, 3, 4, 8"));
  } else {
    TORCH_CHECK_VALUE(bits == 4 || bits == 8, msg(op, ": unsupported bits=", bits, " on this device; supported: 4, 8 "
                      "(2- and 3-bit values have CPU kernels only)"));
  }
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, msg(op, ": expected ", name,
                   " of dtype float32, bfloat16 or float16, got ", d));
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, msg(op, ": expected ", name, " of dtype ", want, ", got ",
                   t.scalar_type()));
}

inline void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t want, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == want, msg(op, ": expected ", name, " with ", want, " elements (", what, "), got shape ",
                    shape_str(t)));
}

// Valid group sizes for K: the divisors of K (listed in the error).
inline void check_group_size(const char* op, int64_t group_size, int64_t K) {
  if (group_size == 0 || group_size == -1) return;
  TORCH_CHECK_VALUE(group_size > 0, msg(op, ": group_size must be 0 (per tensor), -1 (per row) or a positive ",
                    "divisor of K, got ", group_size));
  if (K % group_size != 0) {
    std::string divisors;
    for (int64_t d = 1; d <= K; ++d)
      if (K % d == 0) divisors += (d == 1 ? "" : ", ") + std::to_string(d);
    TORCH_CHECK_VALUE(false, msg(op, ": group_size=", group_size, " does not divide K=", K,
                      "; group sizes that divide K: ", divisors));
  }
}

// Scale tensor shape implied by the granularity for x of shape [..., K].
inline std::vector<int64_t> scale_shape(at::IntArrayRef xs, int64_t group_size) {
  if (group_size == 0) return {1};
  std::vector<int64_t> s(xs.begin(), xs.end() - 1);
  s.push_back(group_size == -1 ? 1 : xs.back() / group_size);
  return s;
}

// Checks scale / zero-point tensors (dtype, element count) against the
// granularity for values of shape xs; returns the row stride of the scale
// grid (0 for a single per-tensor scale). Values are checked by the callers.
inline int64_t check_scale_shapes(const char* op, at::IntArrayRef xs, const at::Tensor& scale, const at::Tensor& zp,
                                  int64_t group_size) {
  check_dtype(op, "scale", scale, at::kFloat);
  check_dtype(op, "zero_point", zp, at::kChar);
  const auto want = scale_shape(xs, group_size);
  int64_t n = 1;
  for (auto v : want) n *= v;
  const char* what = group_size == 0 ? "one per tensor" : group_size == -1 ? "one per row" : "one per group";
  check_numel(op, "scale", scale, n, what);
  check_numel(op, "zero_point", zp, n, what);
  return group_size == 0 ? 0 : (xs.back() / (group_size > 0 ? group_size : xs.back()));
}

// Scale values (host memory): finite and > 0; 4-bit zero-points in [-8, 7].
inline void check_scale_values(const char* op, const at::Tensor& scale_cpu, const at::Tensor& zp_cpu, int64_t bits) {
  const at::Tensor s = scale_cpu.contiguous();
  const float* p = s.data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i)
    TORCH_CHECK_VALUE(std::isfinite(p[i]) && p[i] > 0.0f, msg(op, ": scales must be finite and > 0, got scale[", i,
                      "] = ", p[i]));
  if (bits < 8) {
    const int lo = qmin_of(static_cast<int>(bits)), hi = qmax_of(static_cast<int>(bits));
    const at::Tensor z = zp_cpu.contiguous();
    const int8_t* zz = z.data_ptr<int8_t>();
    for (int64_t i = 0; i < z.numel(); ++i)
      TORCH_CHECK_VALUE(zz[i] >= lo && zz[i] <= hi, msg(op, ": ", bits, "-bit zero-points must lie in [", lo, ", ", hi,
                        "], got ", int(zz[i])));
  }
}

// The int8 GEMM operands: a [M, K] and b [N, K], int8, K within the range
// where int32 accumulation is exact.
constexpr int64_t kMaxK = 65536;  // |acc| <= 255 * 128 * K must fit int32
inline void check_gemm_shapes(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_dtype(op, "a", a, at::kChar);
  check_dtype(op, "b (weights)", b, at::kChar);
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, msg(op, ": expected 2-D a [M, K] and b [N, K], got a ", shape_str(a),
                    " and b ", shape_str(b)));
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), msg(op, ": K mismatch: a is [M=", a.size(0), ", K=", a.size(1),
                    "] but b is [N=", b.size(0), ", K=", b.size(1), "]"));
  TORCH_CHECK_VALUE(a.size(1) <= kMaxK, msg(op, ": K=", a.size(1), " exceeds the int32-exact limit ", kMaxK));
}

inline void check_out_dtype(const char* op, at::ScalarType d) {
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, msg(op,
                   ": out_dtype must be float32, bfloat16 or float16, got ", d));
}

// Storage for quantized values of shape xs: int8, or uint8 rows packed along
// the last dim (quant_math.h: packed_row_bytes).
inline at::Tensor q_storage(at::IntArrayRef xs, int64_t bits, const at::TensorOptions& o) {
  std::vector<int64_t> s(xs.begin(), xs.end());
  if (bits != 8) {
    s.back() = packed_row_bytes(s.back(), static_cast<int>(bits));
    return at::empty(s, o.dtype(at::kByte));
  }
  return at::empty(s, o.dtype(at::kChar));
}

// Effective group length along K (per tensor and per row use whole rows).
inline int64_t group_len(int64_t group_size, int64_t K) { return group_size > 0 ? group_size : K; }

inline cpu::FloatType float_type(at::ScalarType d) {
  return d == at::kFloat ? cpu::FloatType::F32 : d == at::kBFloat16 ? cpu::FloatType::BF16 : cpu::FloatType::F16;
}

// [rows, K] view with unit stride along K (copies only if the last dim is strided
// or the leading dims cannot be flattened). rows is the product of the leading
// dims, given explicitly: reshape({-1, 0}) cannot infer it when K = 0.
// An op's result must be a tensor of its own, never a view of one of its
// intermediates: for ops without a backward, autograd's fallback refuses an
// in-place edit of a view output (Falcon's `mlp_output += attention_output`
// under grad mode). `t` is a fresh result computed as rows [M, N]; resize_
// relabels its shape in place (row-major, same number of elements), no copy.
inline at::Tensor shaped_result(at::Tensor t, at::IntArrayRef shape) {
  if (t.is_view() || !t.is_contiguous()) return t.reshape(shape).clone();
  return t.resize_(shape);
}

inline at::Tensor rows_view(const at::Tensor& x) {
  const int64_t K = x.dim() ? x.size(-1) : 1;
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  at::Tensor v = x.reshape({rows, K});
  if (v.stride(1) != 1 || (v.size(0) > 1 && v.stride(0) < K)) v = v.contiguous();
  return v;
}

}  // namespace llmeq
