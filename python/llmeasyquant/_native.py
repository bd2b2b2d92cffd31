"""Loads the compiled extension (which registers torch.ops.llmeasyquant.*)."""

from __future__ import annotations

import functools

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from . import _C
except ImportError as err:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "llmeasyquant: the native extension llmeasyquant._C could not be loaded "
        f"({err}). Build it from the source tree with "
        "`pip install --no-build-isolation .` (needs torch, cmake>=3.26, ninja, "
        "pybind11 and scikit-build-core installed) or run `make demo`."
    ) from err


@functools.lru_cache(maxsize=None)
def _static_build_info() -> dict:
    return dict(_C.build_info())


def build_info() -> dict:
    """What this installation was built with: version, torch version it was
    compiled against, CUDA on/off and archs, CPU kernels and the ISA in use."""
    info = dict(_static_build_info())
    info.update({k: v for k, v in _C.build_info().items() if k == "cpu_isa_active"})
    info["torch_version_runtime"] = torch.__version__
    return info


def has_cuda_kernels() -> bool:
    return bool(_static_build_info()["cuda"])


# The CPU tiers whose W4A8 kernel QLinear takes (gemm_w4a8.cpp: AVX2, which
# AVX-512 CPUs run too). The Arm tiers have a NEON W4A8 kernel, checked
# bit-exact under qemu but not timed on Arm hardware: QLinear keeps the
# simulated route there until it is.
_W4A8_SIMD_TIERS = ("avx2", "avx512_vnni", "avx512_amx")


def has_w4a8_simd() -> bool:
    """Whether this CPU runs a SIMD W4A8 kernel (the detected tier; a
    LLMEQ_CPU_ISA cap below it still gets the scalar path)."""
    return _static_build_info()["cpu_isa_detected"] in _W4A8_SIMD_TIERS


def has_prepacked_simd() -> bool:
    """Whether the kernels on pre-packed weights (W8A8 "panel64", W4A8
    "w4panel16") run their SIMD code now: an AVX-512 tier in use (avx512_vnni,
    avx512_amx), the LLMEQ_CPU_ISA cap included (asked of the C++ dispatch on
    every call: QLinear asks per forward)."""
    return _C.has_prepacked_simd()
