// Runtime ISA detection and the LLMEQ_CPU_ISA cap.
#include <cstdlib>
#include <cstring>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "llmeq/cpu_kernels.h"

namespace llmeq {
namespace cpu {

namespace {

#if defined(__x86_64__)
// AMX tile data is an XSAVE state component that Linux (5.16+) leaves off
// until the process asks for it: without ARCH_REQ_XCOMP_PERM the first tile
// instruction is SIGILL even where CPUID announces AMX.  The request is
// process-wide and made once, here; a refusal (older kernel, a hypervisor
// that hides the state) only means no AMX tier.  The values are the kernel's
// uapi (arch/x86/include/uapi/asm/prctl.h, XFEATURE_XTILEDATA = 18).
bool amx_permitted() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

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
  // The AMX file is compiled with the AVX-512 flags plus -mamx-tile
  // -mamx-int8: the tier needs the AVX-512 tier too (every AMX CPU has it).
  if (avx512 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
      amx_permitted())
    return Isa::Avx512Amx;
  if (avx512) return Isa::Avx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#elif defined(__aarch64__)
  // AdvSIMD is part of ARMv8-A (every aarch64 Linux CPU has it); sdot/udot
  // (ARMv8.2 FEAT_DotProd, optional: Cortex-A76 / Neoverse N1 / Apple M1 and
  // later, not Cortex-A53/A57/A72) is announced by the kernel in AT_HWCAP.
  // The values are the kernel's uapi (arch/arm64/include/uapi/asm/hwcap.h).
#if defined(__linux__)
  constexpr unsigned long kHwcapAsimd = 1ul << 1;     // HWCAP_ASIMD
  constexpr unsigned long kHwcapAsimdDp = 1ul << 20;  // HWCAP_ASIMDDP
  const unsigned long hw = getauxval(AT_HWCAP);
  if ((hw & kHwcapAsimd) && (hw & kHwcapAsimdDp)) return Isa::NeonDotprod;
  if (hw & kHwcapAsimd) return Isa::Neon;
#else
  return Isa::Neon;  // no auxv to ask: the baseline tier only
#endif
#endif
  return Isa::Scalar;
}

// Position on the tier's chain (see cpu_kernels.h) and the chain itself.
int level(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return 0;
    case Isa::Avx2: case Isa::Neon: return 1;
    case Isa::Avx512Vnni: case Isa::NeonDotprod: return 2;
    case Isa::Avx512Amx: return 3;
  }
  return 0;
}
int chain(Isa isa) {  // 0: scalar (on both), 1: x86-64, 2: aarch64
  switch (isa) {
    case Isa::Scalar: return 0;
    case Isa::Avx2: case Isa::Avx512Vnni: case Isa::Avx512Amx: return 1;
    case Isa::Neon: case Isa::NeonDotprod: return 2;
  }
  return 0;
}

}  // namespace

bool isa_within(Isa isa, Isa cap) {
  if (isa == Isa::Scalar) return true;
  return chain(isa) == chain(cap) && level(isa) <= level(cap);
}

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
  } else if (std::strcmp(env, "avx512_amx") == 0) {
    cap = Isa::Avx512Amx;
  } else if (std::strcmp(env, "neon") == 0) {
    cap = Isa::Neon;
  } else if (std::strcmp(env, "neon_dotprod") == 0) {
    cap = Isa::NeonDotprod;
  } else {
    return best;  // unknown value: no cap
  }
  if (isa_within(best, cap)) return best;  // cap at or above the best tier
  if (isa_within(cap, best)) return cap;   // a lower tier of the same chain
  return Isa::Scalar;                      // the other architecture's tier
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512_vnni";
    case Isa::Avx512Amx: return "avx512_amx";
    case Isa::Neon: return "neon";
    case Isa::NeonDotprod: return "neon_dotprod";
  }
  return "unknown";
}

}  // namespace cpu
}  // namespace llmeq
