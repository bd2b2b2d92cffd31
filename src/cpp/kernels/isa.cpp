// Runtime ISA detection and the LLMEQ_CPU_ISA cap.
#include <cstdlib>
#include <cstring>

#include "llmeq/cpu_kernels.h"

namespace llmeq {
namespace cpu {

namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // The AVX-512 translation units are compiled with
  // -mavx512{f,bw,vl,dq,vnni,bf16} -mf16c -mfma, so the compiler may emit any
  // of them there: the tier requires all (Zen 4, Sapphire Rapids and later).
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vnni") &&
                      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
  if (avx512) return Isa::Avx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#endif
  return Isa::Scalar;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();  // thread-safe one-time init
  return isa;
}

Isa active_isa() {
  const Isa best = detected_isa();
  const char* env = std::getenv("LLMEQ_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  Isa cap;
  if (std::strcmp(env, "scalar") == 0) {
    cap = Isa::Scalar;
  } else if (std::strcmp(env, "avx2") == 0) {
    cap = Isa::Avx2;
  } else if (std::strcmp(env, "avx512_vnni") == 0) {
    cap = Isa::Avx512Vnni;
  } else {
    return best;  // unknown value: no cap
  }
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512_vnni";
  }
  return "unknown";
}

}  // namespace cpu
}  // namespace llmeq
