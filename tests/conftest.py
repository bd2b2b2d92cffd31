"""Shared fixtures: one `device` fixture drives every op test (CPU always, CUDA
when this build registered CUDA kernels and a GPU is present), one `cpu_isa`
fixture runs the CPU kernels once per instruction-set path this CPU has."""

from __future__ import annotations

import os

import pytest
import torch

import llmeasyquant as lq
from llmeasyquant import _reference as R

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def _has_cuda_kernels() -> bool:
    return (torch.cuda.is_available()
            and torch._C._dispatch_has_kernel_for_dispatch_key("llmeasyquant::quantize", "CUDA"))


HAS_CUDA_KERNELS = _has_cuda_kernels()
# The CUDA cases carry the `cuda` marker (`pytest -m cuda` selects them) and
# skip, saying why, where there is no GPU or the build has no CUDA kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA GPU and a CUDA build of llmeasyquant"),
])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# The tier chains of src/cpp/include/llmeq/cpu_kernels.h (x86-64, aarch64).
ISA_CHAINS = (("scalar", "avx2", "avx512_vnni", "avx512_amx"), ("scalar", "neon", "neon_dotprod"))


def _isas():
    best = lq.build_info()["cpu_isa_detected"]
    order = next(c for c in ISA_CHAINS if best in c)
    return list(order[: order.index(best) + 1])


@pytest.fixture(params=_isas())
def cpu_isa(request, monkeypatch):
    monkeypatch.setenv("LLMEQ_CPU_ISA", request.param)
    assert lq.build_info()["cpu_isa_active"] == request.param
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: threads only add contention (and the machine may be busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand_int8(*shape, lo=-128, hi=127, gen=None):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=gen)


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """Same values as x, last dim strided (every other element of a wider tensor)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor):
    """Tolerance relative to the reference's own float error (STYLE.md 9):
    the kernel's error against an fp64 computation may be at most 4x the fp32
    reference's error plus one rounding step of the output dtype."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err_ref = (ref.double() - ref64).abs().max().item() if ref.numel() else 0.0
    ulp = torch.finfo(out.dtype).eps * max(1.0, ref64.abs().max().item() if ref.numel() else 1.0)
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    assert err <= 4 * err_ref + ulp, f"max error {err:.3g} vs reference error {err_ref:.3g} (+ulp {ulp:.3g})"


__all__ = ["R", "lq", "DATA_DIR", "rand_int8", "noncontig", "assert_close_to_reference"]
