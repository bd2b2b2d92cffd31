"""Typed Python wrappers of the LLMEasyQuant ops (``torch.ops.llmeasyquant``).

Conventions (scales fp32, zero-points int8, ``x = scale * (q - zero_point)``,
packing order, ``group_size`` 0 / -1 / g) are :mod:`llmeasyquant.quant_format`.

The wrappers own every "this device has no kernel for this case" decision, so
no caller branches on devices: 2- and 3-bit values on CUDA (whose kernels take
4 and 8 bits) and float16-scale quantization go to the PyTorch fallback
(:mod:`llmeasyquant._fallback`), which is also the weight-path ops' kernel on
devices this build has none for, and the Hadamard transform of rows longer
than the CUDA kernel takes. The int8-GEMM ops and the activation
statistics have compiled kernels only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _checks, _fallback, _native, hadamard
from .quant_format import SUPPORTED_BITS, pack_int4, scale_dtype_of, unpack_int4  # noqa: F401  (re-exported)

_ops = torch.ops.llmeasyquant

PER_TENSOR = 0
PER_ROW = -1


def kernel(name: str):
    """The registered op ``name`` itself (its default overload): the C++ checks
    and kernels without this module's Python wrapper, for callers that bind
    the arguments once and call it many times (:meth:`QLinear.bound_forward`:
    a decode step makes ~200 calls of ~20-60 us, where a wrapper's few us
    count)."""
    return getattr(_ops, name).default


def kernels_lack(bits: int, device: torch.device) -> bool:
    """Whether ``device``'s kernels lack ``bits``-bit values that the ops take on
    every device (2/3 bits on CUDA): those calls go to ``_fallback``. (No
    device-type shortcut: tests/test_fallback.py runs the CUDA rules on the CPU
    through ``_checks.kernel_bits``.)"""
    return bits in SUPPORTED_BITS and bits not in _checks.kernel_bits(device)


def _check_device(op: str, *tensors: Optional[torch.Tensor]) -> None:
    # the ops without a PyTorch fallback kernel: say which build is missing
    for t in tensors:
        if t is not None and t.is_cuda and not _native.has_cuda_kernels():
            raise RuntimeError(
                f"llmeasyquant.{op}: got a CUDA tensor, but this build of llmeasyquant has no CUDA "
                "kernels (build_info()['cuda'] is False). Rebuild with a CUDA toolkit and a CUDA "
                "build of torch (LLMEQ_CUDA=ON), or move the tensors to the CPU."
            )


def quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True, group_size: int = PER_ROW, *,
             scale_dtype=torch.float32):
    """Dynamic quantization. Returns ``(q, scale, zero_point)``.

    ``group_size``: 0 per tensor, -1 per row (channel/token), g>0 group-wise.
    ``q`` is int8 ``[..., K]`` (8-bit) or packed uint8 (``quant_format.pack_bits``).
    ``scale_dtype=torch.float16`` (or ``"float16"``): each scale is rounded to
    float16 (``quant_format.storable_scale``) *before* the integers are chosen,
    so a layer holding float16 scales holds exactly the pair the quantizer
    picked; the scales come back float32 (the values are float16's). The
    kernels compute float32 scales only, so this mode runs in PyTorch.
    """
    scale_dtype = scale_dtype_of(scale_dtype)
    if scale_dtype != torch.float32 or kernels_lack(bits, x.device):
        _checks.quantize(x, bits, symmetric, group_size, rule=_checks.ANY_DEVICE)
        return _fallback.quantize(x, bits, symmetric, group_size, scale_dtype)
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
    if kernels_lack(bits, x.device):
        # the values are checked where they exist (eagerly), as the kernels do
        _checks.quantize_static(x, scale, zero_point, bits, group_size, values=not torch.compiler.is_compiling(),
                                rule=_checks.ANY_DEVICE)
        return _fallback.quantize_static(x, scale, zero_point, bits, group_size)
    return _ops.quantize_static(x, scale, zero_point, bits, group_size)


def dequantize(q, scale, zero_point, bits: int, group_size: int, K: int, dtype=torch.float32) -> torch.Tensor:
    if kernels_lack(bits, q.device):
        _checks.dequantize(q, scale, zero_point, bits, group_size, K, dtype, rule=_checks.ANY_DEVICE)
        return _fallback.dequantize_as_int8(q, scale, zero_point, bits, group_size, K, dtype)
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


def dynamic_quant_linear_packed(x, w_packed, w_scale, w_sum, in_features: int, out_features: int, bias=None,
                                act_symmetric: bool = True) -> torch.Tensor:
    """:func:`dynamic_quant_linear` with the ``[out_features, in_features]``
    weight in the CPU's pre-packed panel layout
    (:func:`llmeasyquant.cpu_pack.pack_int8_panels`, which pads both sizes):
    the same numbers, bit for bit, without the per-call
    packing or lane reductions of the row-major kernel where
    :func:`int8_prepacked_fast`. CPU tensors only (the layout is the CPU
    kernel's)."""
    return _ops.dynamic_quant_linear_packed(x, w_packed, w_scale, w_sum, int(in_features), int(out_features), bias,
                                            act_symmetric)


def int8_prepacked_fast() -> bool:
    """Whether :func:`dynamic_quant_linear_packed` runs a SIMD kernel here: an
    AVX-512 tier in use, ``avx512_vnni`` or ``avx512_amx`` (AMX tiles where
    M >= 8 and K % 64 == 0; an ``LLMEQ_CPU_ISA`` cap below counts, read on
    every call). Elsewhere it runs a scalar loop and the row-major op is the
    fast one."""
    return _native.has_prepacked_simd()


def weight_only_linear(x, qw, scale, zero_point=None, bits: int = 8, group_size: int = PER_ROW,
                       bias=None) -> torch.Tensor:
    """Weight-only linear (W8A16 ... W2A16): float activations, int8 or packed weights."""
    if kernels_lack(bits, x.device):
        _checks.weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias, rule=_checks.ANY_DEVICE)
        return _fallback.weight_only_linear_as_int8(x, qw, scale, zero_point, bits, group_size, bias)
    return _ops.weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias)


def w4a8_linear(x, qw, w_scale, w_zero=None, group_size: int = PER_ROW, bias=None) -> torch.Tensor:
    """W4A8: per-token symmetric 8-bit activations (quantized inside) x 4-bit
    group-wise weights (packed, ``quant_format.pack_int4``), an exact int32
    product per weight group, the group scales applied in fp32 after it
    (:func:`llmeasyquant._reference.w4a8_linear` is the definition). A
    compiled kernel on the CPU (SIMD where :func:`w4a8_fast`); the PyTorch kernel
    (``_fallback.w4a8_linear``, same numbers) on other devices."""
    return _ops.w4a8_linear(x, qw, w_scale, w_zero, int(group_size), bias)


def w4a8_linear_packed(x, w_packed, gparams, in_features: int, out_features: int, group_size: int = PER_ROW,
                       bias=None) -> torch.Tensor:
    """:func:`w4a8_linear` with the ``[out_features, in_features]`` weight in the
    CPU's pre-packed W4A8 layout (:func:`llmeasyquant.cpu_pack.pack_w4a8`, which
    pads both sizes): the same numbers, bit for bit,
    without horizontal reductions where :func:`w4a8_prepacked_fast`. CPU
    tensors only (the layout is the CPU kernel's); ``gparams`` is a trusted
    cache derived from the layer's scales and zero-points."""
    return _ops.w4a8_linear_packed(x, w_packed, gparams, int(in_features), int(out_features), int(group_size), bias)


def w4a8_prepacked_fast(K: int, group_size: int) -> bool:
    """Whether :func:`w4a8_linear_packed` runs its SIMD kernel now for a layer
    of ``K`` inputs in groups of ``group_size``: an AVX-512 tier in use
    (``avx512_vnni`` or ``avx512_amx``; LLMEQ_CPU_ISA read on every call) and
    groups of a multiple of 8."""
    g = K if group_size == PER_ROW else group_size
    return g > 0 and g % 8 == 0 and _native.has_prepacked_simd()


def w4a8_fast(K: int, group_size: int) -> bool:
    """Whether :func:`w4a8_linear` runs a SIMD kernel on CPU tensors for a
    layer of ``K`` inputs in groups of ``group_size``: the AVX2 tier (AVX-512
    CPUs included) with groups of a multiple of 32 values. The compiled kernel
    is the CPU's only. Elsewhere the op runs its scalar loop (other group
    sizes), its NEON kernel (Arm: not timed on Arm hardware yet) or, on CUDA,
    its PyTorch kernel (each group in float64); QLinear then takes quantize ->
    dequantize -> weight_only_linear (same real number, one rounding more)."""
    g = K if group_size == PER_ROW else group_size
    return g > 0 and g % 32 == 0 and _native.has_w4a8_simd()


def weight_row_sums(w: torch.Tensor) -> torch.Tensor:
    """``sum_k w[n, k]`` as int32 (needed by the zero-point correction)."""
    return w.to(torch.int32).sum(dim=1, dtype=torch.int32)


def hadamard_transform(x: torch.Tensor, had_m: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None) -> torch.Tensor:
    """``scale * x @ kron(had_m, S_p)^T`` along the last dim ``n = m * 2**k``
    (:mod:`llmeasyquant.hadamard`: ``had_m = hadamard.small_matrix(n)``, None
    when ``m = 1``; ``scale`` defaults to ``1 / sqrt(n)``, which makes the
    transform orthonormal for a Hadamard ``had_m``). Fast Walsh-Hadamard
    butterflies in float32, ``x.dtype`` out. ``had_m`` (float32 ``[m, m]``) is
    moved to ``x``'s device, a no-op when it is there already: keep it there
    for decode. Rows longer than the CUDA kernel takes
    (``_checks.CUDA_HADAMARD_MAX_N``) run in PyTorch (``hadamard.transform``)."""
    n = x.shape[-1] if x.dim() else 0
    if scale is None:
        scale = 1.0 / math.sqrt(n) if n > 0 else 1.0  # n = 0: the op's check says what is wrong
    if had_m is not None and had_m.device != x.device:
        had_m = had_m.to(x.device)
    if x.is_cuda and n > _checks.CUDA_HADAMARD_MAX_N:
        _checks.hadamard_transform(x, had_m, rule=_checks.ANY_DEVICE)
        return hadamard.transform(x, had_m, scale)
    return _ops.hadamard_transform(x, had_m, float(scale))


def weight_only_linear_panel(x: torch.Tensor, qpanel: torch.Tensor, gparams: torch.Tensor, out_features: int,
                             group_size: int = PER_ROW, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16 from the CUDA panel layout (:mod:`llmeasyquant.panel`: ``pack``
    makes ``qpanel`` / ``gparams`` from a 4-bit layer). bf16/fp16 ``x``; the
    weight formed in x's dtype, ``(q - z) * scale`` rounded once, float32
    accumulation. The tensor-core kernel on CUDA (compiled, not yet validated on
    a GPU); ``panel.linear`` (PyTorch) on every other device."""
    return _ops.weight_only_linear_panel(x, qpanel, gparams, int(out_features), int(group_size), bias)


# --------------------------------------------------------------------------
# decode-step glue (eval/fast_decode.py): one call where HF's LLaMA code makes
# several small ops. CPU kernels; the PyTorch kernel (_reference's HF
# arithmetic) on every other device.
# --------------------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, s)``: ``s = x + residual`` (x's dtype; ``x`` itself copied
    without residual) and LlamaRMSNorm of it, ``weight * (s * rsqrt(mean(s^2)
    + eps)).to(dtype)``, float32 inside. Rows may be strided (last dim unit
    stride avoids a copy)."""
    return _ops.add_rms_norm(x, residual, weight, float(eps))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (LlamaMLP's ``act_fn(gate_proj(x)) * up_proj(x)``):
    gate and up may be the two halves of one joined output (row-strided views)."""
    return _ops.silu_mul(gate, up)


def decode_attention_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                      scale: float) -> torch.Tensor:
    """One decode position of rotate-half RoPE attention with a KV cache
    written in place: ``q`` [B, H*D], ``k`` / ``v`` [B, Hkv*D] (views of a
    joined q/k/v output are fine); ``k_cache`` / ``v_cache`` [B, Hkv, S, D]
    contiguous, their dtype q's; ``cos`` / ``sin`` float32 [D], HF's table
    row for ``pos``. Writes RoPE(k) and v at ``pos``, returns [B, H*D] =
    softmax(scale * RoPE(q) K[:pos+1]^T) V[:pos+1] per query head (GQA:
    head h reads KV head h // (H / Hkv))."""
    return _ops.decode_attention_(q, k, v, k_cache, v_cache, cos, sin, int(pos), float(scale))
