// Per-thread scratch buffer for the SIMD kernels: grown on demand (in whole
// 4 KiB pages) and kept for later calls, so a GEMM does not page-fault a fresh
// allocation on every call.
//
// Internal linkage on purpose (an anonymous namespace in a header): this file
// is included by translation units compiled with different -m flags, and an
// inline function with external linkage would be merged by the linker into one
// copy — possibly the AVX-512 one, which would then run on an AVX2-only CPU.
#pragma once

#include <cstddef>
#include <cstdlib>

namespace llmeq {
namespace cpu {
namespace {

// Not a class template: GCC leaves the destructor of a thread_local object of
// an internal-linkage template uninstantiated (undefined reference at link).
struct ThreadBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  ~ThreadBuffer() { std::free(p); }
  template <typename T>
  T* get(size_t elems) {
    const size_t need = elems * sizeof(T);
    if (need > bytes) {
      std::free(p);
      bytes = (need + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, bytes);
    }
    return static_cast<T*>(p);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace llmeq
