"""Typed Python wrappers of the LLMEasyQuant ops (``torch.ops.llmeasyquant``).

Conventions (scales fp32, zero-points int8, ``x = scale * (q - zero_point)``,
4-bit packing order, ``group_size`` 0 / -1 / g) are documented in
:mod:`llmeasyquant._reference`, which is also the test oracle.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from ._reference import pack_int4, unpack_int4  # noqa: F401  (re-exported)

_ops = torch.ops.llmeasyquant

PER_TENSOR = 0
PER_ROW = -1


def _check_device(op: str, *tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is not None and t.is_cuda and not _native.has_cuda_kernels():
            raise RuntimeError(
                f"llmeasyquant.{op}: got a CUDA tensor, but this build of llmeasyquant has no CUDA "
                "kernels (build_info()['cuda'] is False). Rebuild with a CUDA toolkit and a CUDA "
                "build of torch (LLMEQ_CUDA=ON), or move the tensors to the CPU."
            )


def quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True, group_size: int = PER_ROW):
    """Dynamic quantization. Returns ``(q, scale, zero_point)``.

    ``group_size``: 0 per tensor, -1 per row (channel/token), g>0 group-wise.
    ``q`` is int8 ``[..., K]`` (8-bit) or packed uint8 ``[..., ceil(K/2)]`` (4-bit).
    """
    _check_device("quantize", x)
    return _ops.quantize(x, bits, symmetric, group_size)


def quantize_per_tensor(x: torch.Tensor, bits: int = 8, symmetric: bool = True):
    return quantize(x, bits, symmetric, PER_TENSOR)


def quantize_per_channel(w: torch.Tensor, bits: int = 8, symmetric: bool = True):
    """One scale per output channel (row) of a weight ``[N, K]``."""
    return quantize(w, bits, symmetric, PER_ROW)


def quantize_per_token(x: torch.Tensor, bits: int = 8, symmetric: bool = True):
    """One scale per token (row) of activations ``[..., K]``."""
    return quantize(x, bits, symmetric, PER_ROW)


def quantize_groupwise(x: torch.Tensor, group_size: int, bits: int = 4, symmetric: bool = True):
    """One scale per ``group_size`` consecutive elements along the last dim."""
    if group_size <= 0:
        raise ValueError(f"quantize_groupwise: group_size must be > 0, got {group_size}")
    return quantize(x, bits, symmetric, group_size)


def quantize_static(x, scale, zero_point, bits: int = 8, group_size: int = PER_TENSOR) -> torch.Tensor:
    """Quantize with given (calibrated) scales; scales must be finite and > 0."""
    _check_device("quantize_static", x, scale, zero_point)
    return _ops.quantize_static(x, scale, zero_point, bits, group_size)


def dequantize(q, scale, zero_point, bits: int, group_size: int, K: int, dtype=torch.float32) -> torch.Tensor:
    _check_device("dequantize", q, scale, zero_point)
    return _ops.dequantize(q, scale, zero_point, bits, group_size, K, dtype)


def channel_stats_(x, absmax, mn, mx) -> None:
    """Fold per-channel absmax/min/max of ``x [..., K]`` into running ``[K]`` stats in place."""
    _check_device("channel_stats_", x, absmax, mn, mx)
    _ops.channel_stats_(x, absmax, mn, mx)


def new_channel_stats(K: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty running statistics for :func:`channel_stats_` (absmax, min, max)."""
    return (
        torch.zeros(K, dtype=torch.float32, device=device),
        torch.full((K,), float("inf"), dtype=torch.float32, device=device),
        torch.full((K,), float("-inf"), dtype=torch.float32, device=device),
    )


def new_ema_state(device=None) -> torch.Tensor:
    """State for :func:`ema_quantize_`: (absmax, min, max, steps), all zero."""
    return torch.zeros(4, dtype=torch.float32, device=device)


def ema_quantize_(x, state, alpha: float = 0.9, eps: float = 1e-5, bits: int = 8, symmetric: bool = True,
                  update: bool = True):
    """Online EMA-scaled per-tensor quantization (paper Algorithm 1).

    Updates ``state`` in place (no host synchronisation on devices) and returns
    ``(q, scale [1], zero_point [1])`` computed with the updated state.
    A batch with NaN / Inf values is not observed: ``state`` (``steps``
    included) stays as it was and the batch is quantized with it, so a skipped
    observation shows as ``state[3]`` not advancing (see :func:`ema_skipped`).
    """
    _check_device("ema_quantize_", x, state)
    return _ops.ema_quantize_(x, state, alpha, eps, bits, symmetric, update)


def ema_skipped(steps_before: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Whether the :func:`ema_quantize_` call (``update=True``) between
    ``steps_before = state[3].clone()`` and now skipped its observation (a
    non-finite batch): a bool tensor on the state's device, no host sync."""
    return state[3] == steps_before


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M,K] int8 @ b[N,K].T int8 -> int32 [M,N]``."""
    _check_device("int8_gemm", a, b)
    return _ops.int8_gemm(a, b)


def scaled_int8_gemm(a, a_scale, b, b_scale, *, a_zero=None, b_sum=None, bias=None,
                     out_dtype=torch.float32) -> torch.Tensor:
    """``(a_scale[m] * b_scale[n]) * (a@b.T - a_zero[m] * sum_k b[n,k]) + bias[n]``.

    ``b_sum``, if given, must be exactly :func:`weight_row_sums` ``(b)``: a
    cache the kernels trust (on x86 also without ``a_zero``) to skip a pass
    over ``b``; it never changes the result."""
    _check_device("scaled_int8_gemm", a, a_scale, a_zero, b, b_scale, b_sum, bias)
    return _ops.scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, b_sum, bias, out_dtype)


def dynamic_quant_linear(x, w, w_scale, w_sum, bias=None, act_symmetric: bool = True) -> torch.Tensor:
    """Fused per-token dynamic quantization + int8 GEMM (paper Algorithm 2).
    ``w_sum`` must be exactly :func:`weight_row_sums` ``(w)`` (a trusted cache)."""
    _check_device("dynamic_quant_linear", x, w, w_scale, w_sum, bias)
    return _ops.dynamic_quant_linear(x, w, w_scale, w_sum, bias, act_symmetric)


def weight_only_linear(x, qw, scale, zero_point=None, bits: int = 8, group_size: int = PER_ROW,
                       bias=None) -> torch.Tensor:
    """W8A16 / W4A16 linear: float activations, int8 or packed int4 weights."""
    _check_device("weight_only_linear", x, qw, scale, zero_point, bias)
    return _ops.weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias)


def weight_row_sums(w: torch.Tensor) -> torch.Tensor:
    """``sum_k w[n, k]`` as int32 (needed by the zero-point correction)."""
    return w.to(torch.int32).sum(dim=1, dtype=torch.int32)
