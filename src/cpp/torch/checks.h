// Argument checks shared by the CPU and CUDA op implementations. Every message
// says which op, what was expected and what came. The fake implementations in
// python/llmeasyquant/_fake.py mirror these for traced code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

#include "llmeq/cpu_kernels.h"

namespace llmeq {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, op, ": unsupported bits=", bits, "; supported: 4, 8");
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": expected ", name,
                   " of dtype float32, bfloat16 or float16, got ", d);
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": expected ", name, " of dtype ", want, ", got ",
                   t.scalar_type());
}

inline void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t want, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == want, op, ": expected ", name, " with ", want, " elements (", what, "), got shape ",
                    shape_str(t));
}

// Valid group sizes for K: the divisors of K (listed in the error).
inline void check_group_size(const char* op, int64_t group_size, int64_t K) {
  if (group_size == 0 || group_size == -1) return;
  TORCH_CHECK_VALUE(group_size > 0, op, ": group_size must be 0 (per tensor), -1 (per row) or a positive ",
                    "divisor of K, got ", group_size);
  if (K % group_size != 0) {
    std::ostringstream os;
    for (int64_t d = 1; d <= K; ++d)
      if (K % d == 0) os << (d == 1 ? "" : ", ") << d;
    TORCH_CHECK_VALUE(false, op, ": group_size=", group_size, " does not divide K=", K,
                      "; group sizes that divide K: ", os.str());
  }
}

// Scale tensor shape implied by the granularity for x of shape [..., K].
inline std::vector<int64_t> scale_shape(at::IntArrayRef xs, int64_t group_size) {
  if (group_size == 0) return {1};
  std::vector<int64_t> s(xs.begin(), xs.end() - 1);
  s.push_back(group_size == -1 ? 1 : xs.back() / group_size);
  return s;
}

// Effective group length along K (per tensor and per row use whole rows).
inline int64_t group_len(int64_t group_size, int64_t K) { return group_size > 0 ? group_size : K; }

inline cpu::FloatType float_type(at::ScalarType d) {
  return d == at::kFloat ? cpu::FloatType::F32 : d == at::kBFloat16 ? cpu::FloatType::BF16 : cpu::FloatType::F16;
}

// [rows, K] view with unit stride along K (copies only if the last dim is strided
// or the leading dims cannot be flattened).
inline at::Tensor rows_view(const at::Tensor& x) {
  const int64_t K = x.dim() ? x.size(-1) : 1;
  at::Tensor v = x.reshape({-1, K});
  if (v.stride(1) != 1 || (v.size(0) > 1 && v.stride(0) < K)) v = v.contiguous();
  return v;
}

}  // namespace llmeq
