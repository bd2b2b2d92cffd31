// The Python extension module llmeasyquant._C. Importing it registers every op
// (static initialisers in schema.cpp / register_*.cpp); pybind11 is used only
// for the small build-information API below.
#include <pybind11/pybind11.h>

#include "llmeq/cpu_kernels.h"

#ifndef LLMEQ_VERSION
#define LLMEQ_VERSION "unknown"
#endif
#ifndef LLMEQ_TORCH_VERSION
#define LLMEQ_TORCH_VERSION "unknown"
#endif
#ifndef LLMEQ_CUDA_ARCHS
#define LLMEQ_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace llmeq {
#if defined(LLMEQ_WITH_CUDA)
// Defined in src/cuda/cuda_info.cu.
int cuda_runtime_version_built();
#endif
}  // namespace llmeq

PYBIND11_MODULE(_C, m) {
  m.doc() = "LLMEasyQuant native kernels (ops are registered under torch.ops.llmeasyquant)";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = LLMEQ_VERSION;
    d["torch_version"] = LLMEQ_TORCH_VERSION;
#if defined(LLMEQ_WITH_CUDA)
    d["cuda"] = true;
    d["cuda_archs"] = LLMEQ_CUDA_ARCHS;
    d["cuda_runtime_version"] = llmeq::cuda_runtime_version_built();
#else
    d["cuda"] = false;
    d["cuda_archs"] = "";
    d["cuda_runtime_version"] = py::none();
#endif
#if defined(_OPENMP)
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["cpu_kernels_compiled"] = py::make_tuple("scalar", "avx2", "avx512_vnni");
    d["cpu_isa_detected"] = llmeq::cpu::isa_name(llmeq::cpu::detected_isa());
    d["cpu_isa_active"] = llmeq::cpu::isa_name(llmeq::cpu::active_isa());
    return d;
  });
}
