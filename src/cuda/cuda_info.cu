// Build facts of the CUDA side. The CUDA kernels themselves land with the CUDA
// issue; this file proves the CUDA toolchain path of the build (nvcc + a CUDA
// build of torch) and reports what it was built with.
#include <cuda_runtime_api.h>

namespace llmeq {
int cuda_runtime_version_built() { return CUDART_VERSION; }
}  // namespace llmeq
