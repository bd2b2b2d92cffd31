// The Python extension module llmeasyquant._C. Importing it registers every op
// (static initialisers in schema.cpp / register_*.cpp); pybind11 is used only
// for the small build-information API below.
#include <pybind11/pybind11.h>

#include <string>

#include "llmeq/cpu_kernels.h"
#include "llmeq/mma_layout.h"

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

// The CUDA kernels' fragment layouts and shared-memory addressing
// (llmeq/mma_layout.h), exposed for CPU unit tests: (row, col) or
// (row, byte offset) for one lane and element / k-step.
static py::tuple mma_layout(const std::string& what, int lane, int i) {
  using namespace llmeq::mma;
  RC r{};
  if (what == "s8_a") r = s8_a(lane, i);
  else if (what == "s8_b") r = s8_b(lane, i);
  else if (what == "acc_c") r = acc_c(lane, i);
  else if (what == "h_a") r = h_a(lane, i);
  else if (what == "h_b") r = h_b(lane, i);
  else if (what == "ldsm_s8_a") r = ldsm_s8_a(lane, i);
  else if (what == "ldsm_s8_b") r = ldsm_s8_b(lane, i);
  else if (what == "ldsm_h_a") r = ldsm_h_a(lane, i);
  else if (what == "swz64") return py::make_tuple(lane, swz64(lane, i));
  else if (what == "swz128") return py::make_tuple(lane, swz128(lane, i));
  // w4 panel: i = word * 8 + nibble -> (k, n) inside the k16 x n64 tile
  else if (what == "w4_panel_elem") r = w4_panel_elem(lane, i >> 3, i & 7);
  // w4 panel: lane = k, i = n (inside the tile) -> (lane, word * 8 + nibble)
  else if (what == "w4_panel_slot") {
    const PanelSlot s = w4_panel_slot(lane, i);
    return py::make_tuple(s.lane, s.word * 8 + s.nibble);
  }
  else if (what == "w4_panel_param") return py::make_tuple(lane, w4_panel_param(lane, i));
  else throw py::value_error("unknown layout '" + what + "'");
  return py::make_tuple(r.row, r.col);
}

PYBIND11_MODULE(_C, m) {
  m.def("_mma_layout", &mma_layout, "fragment layout / smem addressing of the CUDA kernels (tests)");
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
    // The tiers compiled for this architecture (CMakeLists.txt: x86-64 and
    // aarch64 each build their own SIMD files only).
#if defined(__x86_64__)
    d["cpu_kernels_compiled"] = py::make_tuple("scalar", "avx2", "avx512_vnni", "avx512_amx");
#elif defined(__aarch64__)
    d["cpu_kernels_compiled"] = py::make_tuple("scalar", "neon", "neon_dotprod");
#else
    d["cpu_kernels_compiled"] = py::make_tuple("scalar");
#endif
    d["cpu_isa_detected"] = llmeq::cpu::isa_name(llmeq::cpu::detected_isa());
    d["cpu_isa_active"] = llmeq::cpu::isa_name(llmeq::cpu::active_isa());
    return d;
  });
  // Per call (QLinear asks on every CPU forward): the active tier, cap included.
  m.def("has_prepacked_simd", &llmeq::cpu::has_prepacked_simd,
        "whether the CPU kernels on pre-packed weights run SIMD code now (cpu_kernels.h)");
}
