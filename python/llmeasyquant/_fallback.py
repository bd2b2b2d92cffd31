"""The ops in plain PyTorch, for what no compiled kernel covers.

Two gaps, both closed in the ops layer so that callers (QLinear, the methods,
the KV cache) never ask which device they run on:

* A device this build has no kernels for (CUDA when the extension was built
  without it, ``build_info()["cuda"]`` False; MPS, XPU, ...): the PyTorch
  implementations below are registered as the weight-path ops'
  ``CompositeExplicitAutograd`` kernel. The dispatcher takes that kernel only
  for a device with no kernel of its own, so the compiled CPU and CUDA
  kernels always win and the fakes (Meta) stay what torch.compile traces.
  Each registered kernel first runs the op's checker with the device's
  kernel rules, so the op fails on such a device exactly as its fake does.
* 2- and 3-bit values on CUDA, whose kernels take 4 and 8 bits: ``ops.py``
  sends those calls here. quantize / quantize_static run in PyTorch;
  dequantize / weight_only_linear unpack the values to int8 and call the
  device's 8-bit kernel: ``x = scale * (q - zero_point)`` is the same at any
  width, so the result is too (memory stays packed, speed is that of W8A16).

Same numbers as the kernels: bit for bit for quantize / quantize_static /
dequantize (the same IEEE operations in the same order), up to float summation
order for weight_only_linear and hadamard_transform's cross-block product
(without had_m bit for bit: the same butterflies; tests/test_fallback.py and
tests/test_hadamard_op.py compare them with the CPU kernels). The operations
stay on the tensors' device (no host copies).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks, hadamard
from . import _native  # noqa: F401  (the schemas must exist before the kernels are registered)
from ._checks import scale_shape
from .quant_format import (group_view, pack_bits, quantize_values, scale_from_absmax, scale_zp_from_minmax,
                           unpack_bits)

_ops = torch.ops.llmeasyquant


# --------------------------------------------------------------------------
# in PyTorch (no checks: callers check first)
# --------------------------------------------------------------------------
def _reduce(t: torch.Tensor, kind: str) -> torch.Tensor:
    # an empty row (K = 0) gets the kernels' starting values: absmax 0, min +inf, max -inf
    if t.shape[-1] == 0:
        fill = {"absmax": 0.0, "min": float("inf"), "max": float("-inf")}[kind]
        return torch.full(t.shape[:-1], fill, dtype=t.dtype, device=t.device)
    return t.amin(dim=-1) if kind == "min" else t.amax(dim=-1)


def scales(x: torch.Tensor, bits: int, symmetric: bool, group_size: int, scale_dtype=torch.float32):
    """(scale, zero_point) of dynamic quantization, shaped as the op returns
    them; scales float32, rounded to ``scale_dtype`` first (float16 weight scales)."""
    xg = group_view(x.float(), group_size)
    if symmetric:
        scale = scale_from_absmax(_reduce(xg.abs(), "absmax"), bits, scale_dtype)
        zp = torch.zeros_like(scale, dtype=torch.int8)
    else:
        scale, zp = scale_zp_from_minmax(_reduce(xg, "min"), _reduce(xg, "max"), bits, scale_dtype)
    shape = scale_shape(list(x.shape), group_size)
    return scale.reshape(shape), zp.reshape(shape)


def quantize_static(x, scale, zero_point, bits: int, group_size: int) -> torch.Tensor:
    xg = group_view(x.float(), group_size)
    q = quantize_values(xg, scale.float().reshape(xg.shape[:-1]), zero_point.reshape(xg.shape[:-1]), bits)
    return pack_bits(q.reshape(x.shape), bits)


def quantize(x, bits: int, symmetric: bool, group_size: int, scale_dtype=torch.float32):
    scale, zp = scales(x, bits, symmetric, group_size, scale_dtype)
    return quantize_static(x, scale, zp, bits, group_size), scale, zp


def dequantize(q, scale, zero_point, bits: int, group_size: int, K: int, dtype) -> torch.Tensor:
    qg = group_view(unpack_bits(q, bits, K).float(), group_size)
    s = scale.float().reshape(qg.shape[:-1]).unsqueeze(-1)
    z = zero_point.float().reshape(qg.shape[:-1]).unsqueeze(-1)
    return (s * (qg - z)).reshape(*q.shape[:-1], K).to(dtype)


def weight_only_linear(x, qw, scale, zero_point, bits: int, group_size: int, bias) -> torch.Tensor:
    zp = zero_point if zero_point is not None else torch.zeros_like(scale, dtype=torch.int8)
    w = dequantize(qw, scale, zp, bits, group_size, x.shape[-1], torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def w4a8_linear(x, qw, w_scale, w_zero, group_size: int, bias) -> torch.Tensor:
    """The CPU kernel's operations (cpu_kernels.h gemm_w4a8) on any device:
    per-token symmetric int8 activations; each group's product in float64,
    exact for |P| < 2^53 (the op's K limit keeps it < 2^31); then fp32
    ``acc = acc + s * float(P)`` group by group, ``a_scale * acc + bias``."""
    K, N = x.shape[-1], qw.shape[0]
    x2 = x.reshape(math.prod(x.shape[:-1]), K)
    M = x2.shape[0]
    acc = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    if K > 0 and M > 0 and N > 0:
        g = K if group_size == -1 else group_size
        qa, sa, _ = quantize(x2, 8, True, -1)
        w = unpack_bits(qw, 4, K).to(torch.float64)
        s = w_scale.float().reshape(N, K // g)
        for gi in range(K // g):
            cols = slice(gi * g, (gi + 1) * g)
            wg = w[:, cols] if w_zero is None else w[:, cols] - w_zero.reshape(N, K // g)[:, gi:gi + 1].double()
            acc = acc + s[:, gi] * (qa[:, cols].double() @ wg.T).float()
        acc = sa.reshape(M, 1) * acc
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], N)


# --------------------------------------------------------------------------
# through the 8-bit kernel (2/3-bit values where the kernels take 4 and 8)
# --------------------------------------------------------------------------
def dequantize_as_int8(q, scale, zero_point, bits: int, group_size: int, K: int, dtype) -> torch.Tensor:
    return _ops.dequantize(unpack_bits(q, bits, K), scale, zero_point, 8, group_size, K, dtype)


def weight_only_linear_as_int8(x, qw, scale, zero_point, bits: int, group_size: int, bias) -> torch.Tensor:
    return _ops.weight_only_linear(x, unpack_bits(qw, bits, x.shape[-1]), scale, zero_point, 8, group_size, bias)


# --------------------------------------------------------------------------
# the ops' kernels for devices without compiled ones
# --------------------------------------------------------------------------
def _quantize_kernel(x, bits, symmetric, group_size):
    _checks.quantize(x, bits, symmetric, group_size)
    return quantize(x, bits, symmetric, group_size)


def _quantize_static_kernel(x, scale, zero_point, bits, group_size):
    _checks.quantize_static(x, scale, zero_point, bits, group_size)
    return quantize_static(x, scale, zero_point, bits, group_size)


def _dequantize_kernel(q, scale, zero_point, bits, group_size, K, dtype):
    _checks.dequantize(q, scale, zero_point, bits, group_size, K, dtype)
    return dequantize(q, scale, zero_point, bits, group_size, K, dtype)


def _weight_only_linear_kernel(x, qw, scale, zero_point, bits, group_size, bias):
    _checks.weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias)
    return weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias)


def _w4a8_linear_kernel(x, qw, w_scale, w_zero, group_size, bias):
    _checks.w4a8_linear(x, qw, w_scale, w_zero, group_size, bias)
    return w4a8_linear(x, qw, w_scale, w_zero, group_size, bias)


def _hadamard_transform_kernel(x, had_m, scale):
    _checks.hadamard_transform(x, had_m)
    return hadamard.transform(x, had_m, scale)


def _add_rms_norm_kernel(x, residual, weight, eps):
    # HF's LlamaRMSNorm after the residual add, op for op
    _checks.add_rms_norm(x, residual, weight, eps)
    s = x + residual if residual is not None else x.clone()
    h = s.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), s


def _silu_mul_kernel(gate, up):
    _checks.silu_mul(gate, up)
    return F.silu(gate) * up


def _rope_rows(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


def _decode_attention_kernel(q, k, v, k_cache, v_cache, cos, sin, pos, scale):
    # float32 RoPE, the cache write, then SDPA over positions 0..pos (GQA)
    H, Hkv, _, D = _checks.decode_attention_(q, k, v, k_cache, v_cache, cos, sin, pos)
    B = q.shape[0]
    k_cache[:, :, pos] = _rope_rows(k.float().reshape(B, Hkv, D), cos, sin).to(k_cache.dtype)
    v_cache[:, :, pos] = v.reshape(B, Hkv, D)
    qr = _rope_rows(q.float().reshape(B, H, 1, D), cos, sin)
    out = F.scaled_dot_product_attention(qr, k_cache[:, :, :pos + 1].float(), v_cache[:, :, :pos + 1].float(),
                                         scale=scale, enable_gqa=H != Hkv)
    return out.reshape(B, H * D).to(q.dtype)


def _weight_only_linear_panel_kernel(x, qpanel, gparams, out_features, group_size, bias):
    from . import panel

    _checks.weight_only_linear_panel(x, qpanel, gparams, out_features, group_size, bias)
    return panel.linear(x, qpanel, gparams, out_features, bias)


# The ops a weight-only QLinear needs (plus quantize_static for set_weight with
# given scales, and the online input rotation before such a layer). The
# int8-GEMM ops and the activation statistics keep compiled kernels only:
# ops.py names the missing build for them.
KERNELS = {
    "quantize": _quantize_kernel,
    "quantize_static": _quantize_static_kernel,
    "dequantize": _dequantize_kernel,
    "weight_only_linear": _weight_only_linear_kernel,
    "hadamard_transform": _hadamard_transform_kernel,
    # the CUDA W4A16 panel layout's op: a compiled kernel on CUDA only; this
    # is its kernel on the CPU (tests, reference) and on other devices
    "weight_only_linear_panel": _weight_only_linear_panel_kernel,
    # W4A8: a compiled kernel on the CPU only; this runs it on CUDA and elsewhere
    "w4a8_linear": _w4a8_linear_kernel,
    # the decode-step glue (eval/fast_decode.py): CPU kernels; elsewhere
    # HF's arithmetic in PyTorch ops
    "add_rms_norm": _add_rms_norm_kernel,
    "silu_mul": _silu_mul_kernel,
    "decode_attention_": _decode_attention_kernel,
}

# Kept at module level: dropping the Library object would unregister the kernels.
_lib = torch.library.Library("llmeasyquant", "IMPL")
for _name, _kernel in KERNELS.items():
    _lib.impl(_name, _kernel, "CompositeExplicitAutograd")
