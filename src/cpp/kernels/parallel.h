// OpenMP helpers for the CPU kernels. The op layer passes torch's thread count
// so our OpenMP pool follows torch.set_num_threads().
#pragma once

#include <cstdint>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace llmeq {
namespace cpu {

inline int resolve_threads(int n) {
#if defined(_OPENMP)
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

// Run fn(begin, end) over [0, n) split into contiguous chunks, one per thread.
template <typename Fn> inline void parallel_rows(int64_t n, int num_threads, Fn&& fn) {
  const int nt = resolve_threads(num_threads);
  if (nt <= 1 || n <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int T = omp_get_num_threads();
    const int64_t chunk = (n + T - 1) / T;
    const int64_t b = t * chunk;
    const int64_t e = b + chunk < n ? b + chunk : n;
    if (b < e) fn(b, e);
  }
#else
  fn(int64_t(0), n);
#endif
}

}  // namespace cpu
}  // namespace llmeq
