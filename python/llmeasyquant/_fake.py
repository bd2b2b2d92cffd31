"""Fake (meta) implementations of every op, so torch.compile / export can trace
them. They validate what can be validated from shapes and dtypes with the same
messages as the C++ checks (src/cpp/torch/checks.h)."""

from __future__ import annotations

import torch

from . import _native  # noqa: F401  (the schemas must exist before register_fake)
from ._reference import packed_len

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_bits(op, bits):
    torch._check_value(bits in (2, 3, 4, 8), lambda: f"{op}: unsupported bits={bits}; supported: 2, 3, 4, 8")


def _check_float(op, name, t):
    torch._check_type(t.dtype in _FLOATS,
                      lambda: f"{op}: expected {name} of dtype float32, bfloat16 or float16, got {t.dtype}")


def _check_dtype(op, name, t, want):
    torch._check_type(t.dtype == want, lambda: f"{op}: expected {name} of dtype {want}, got {t.dtype}")


def _check_group(op, group_size, K):
    if group_size in (0, -1):
        return
    torch._check_value(group_size > 0, lambda: f"{op}: group_size must be 0, -1 or a positive divisor of K")
    torch._check_value(K % group_size == 0, lambda: f"{op}: group_size={group_size} does not divide K={K}")


def _q_shape(shape, bits):
    s = list(shape)
    s[-1] = packed_len(s[-1], bits)
    return s


def _scale_shape(shape, group_size):
    if group_size == 0:
        return [1]
    return [*shape[:-1], 1 if group_size == -1 else shape[-1] // group_size]


def _q_dtype(bits):
    return torch.uint8 if bits != 8 else torch.int8


@torch.library.register_fake("llmeasyquant::quantize")
def _quantize(x, bits, symmetric, group_size):
    op = "llmeasyquant.quantize"
    _check_float(op, "x", x)
    _check_bits(op, bits)
    _check_group(op, group_size, x.shape[-1])
    ss = _scale_shape(x.shape, group_size)
    return (x.new_empty(_q_shape(x.shape, bits), dtype=_q_dtype(bits)),
            x.new_empty(ss, dtype=torch.float32), x.new_empty(ss, dtype=torch.int8))


@torch.library.register_fake("llmeasyquant::quantize_static")
def _quantize_static(x, scale, zero_point, bits, group_size):
    op = "llmeasyquant.quantize_static"
    _check_float(op, "x", x)
    _check_bits(op, bits)
    _check_group(op, group_size, x.shape[-1])
    _check_dtype(op, "scale", scale, torch.float32)
    _check_dtype(op, "zero_point", zero_point, torch.int8)
    return x.new_empty(_q_shape(x.shape, bits), dtype=_q_dtype(bits))


@torch.library.register_fake("llmeasyquant::dequantize")
def _dequantize(q, scale, zero_point, bits, group_size, K, dtype):
    op = "llmeasyquant.dequantize"
    _check_bits(op, bits)
    _check_dtype(op, "q", q, _q_dtype(bits))
    want = packed_len(K, bits)
    torch._check_value(q.shape[-1] == want, lambda: f"{op}: q of shape {tuple(q.shape)} does not hold K={K}")
    return q.new_empty([*q.shape[:-1], K], dtype=dtype)


@torch.library.register_fake("llmeasyquant::channel_stats_")
def _channel_stats(x, absmax, mn, mx):
    _check_float("llmeasyquant.channel_stats_", "x", x)
    return None


@torch.library.register_fake("llmeasyquant::ema_quantize_")
def _ema_quantize(x, state, alpha, eps, bits, symmetric, update):
    op = "llmeasyquant.ema_quantize_"
    _check_float(op, "x", x)
    _check_bits(op, bits)
    _check_dtype(op, "state", state, torch.float32)
    return (x.new_empty(_q_shape(x.shape, bits), dtype=_q_dtype(bits)),
            x.new_empty([1], dtype=torch.float32), x.new_empty([1], dtype=torch.int8))


def _check_gemm(op, a, b):
    _check_dtype(op, "a", a, torch.int8)
    _check_dtype(op, "b (weights)", b, torch.int8)
    torch._check_value(a.dim() == 2 and b.dim() == 2, lambda: f"{op}: expected 2-D a [M, K] and b [N, K]")
    torch._check_value(a.shape[1] == b.shape[1], lambda: (
        f"{op}: K mismatch: a is [M={a.shape[0]}, K={a.shape[1]}] but b is [N={b.shape[0]}, K={b.shape[1]}]"))


@torch.library.register_fake("llmeasyquant::int8_gemm")
def _int8_gemm(a, b):
    _check_gemm("llmeasyquant.int8_gemm", a, b)
    return a.new_empty([a.shape[0], b.shape[0]], dtype=torch.int32)


@torch.library.register_fake("llmeasyquant::scaled_int8_gemm")
def _scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, b_sum, bias, out_dtype):
    _check_gemm("llmeasyquant.scaled_int8_gemm", a, b)
    return a.new_empty([a.shape[0], b.shape[0]], dtype=out_dtype)


def _check_linear(op, x, K_w):
    _check_float(op, "x", x)
    torch._check_value(x.shape[-1] == K_w, lambda: f"{op}: K mismatch: x has K={x.shape[-1]} but the weight has K={K_w}")


@torch.library.register_fake("llmeasyquant::dynamic_quant_linear")
def _dynamic_quant_linear(x, w, w_scale, w_sum, bias, act_symmetric):
    op = "llmeasyquant.dynamic_quant_linear"
    _check_dtype(op, "w", w, torch.int8)
    _check_linear(op, x, w.shape[1])
    return x.new_empty([*x.shape[:-1], w.shape[0]])


@torch.library.register_fake("llmeasyquant::weight_only_linear")
def _weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias):
    op = "llmeasyquant.weight_only_linear"
    _check_bits(op, bits)
    _check_dtype(op, "qw", qw, _q_dtype(bits))
    K = x.shape[-1]
    torch._check_value(qw.shape[1] == packed_len(K, bits),
                       lambda: f"{op}: K mismatch: x has K={K} but the weight has shape {tuple(qw.shape)}")
    _check_float(op, "x", x)
    return x.new_empty([*x.shape[:-1], qw.shape[0]])
