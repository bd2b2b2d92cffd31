"""Fake (meta) implementations of every op, so torch.compile / export can trace
them. Each runs the op's checker from _checks.py (the same checks, order and
messages as the C++ kernels, src/cpp/torch/op_checks.h, minus value checks
that need the data), so a bad call fails the same way under a fake, on meta
tensors and eagerly; mixed devices (meta + cpu) raise instead of tracing."""

from __future__ import annotations

import torch

from . import _checks
from . import _native  # noqa: F401  (the schemas must exist before register_fake)
from ._checks import scale_shape
from .quant_format import packed_len


def _q_shape(shape, bits):
    s = list(shape)
    s[-1] = packed_len(s[-1], bits)
    return s


def _q_dtype(bits):
    return torch.uint8 if bits != 8 else torch.int8


@torch.library.register_fake("llmeasyquant::quantize")
def _quantize(x, bits, symmetric, group_size):
    _checks.quantize(x, bits, symmetric, group_size)
    ss = scale_shape(list(x.shape), group_size)
    return (x.new_empty(_q_shape(x.shape, bits), dtype=_q_dtype(bits)),
            x.new_empty(ss, dtype=torch.float32), x.new_empty(ss, dtype=torch.int8))


@torch.library.register_fake("llmeasyquant::quantize_static")
def _quantize_static(x, scale, zero_point, bits, group_size):
    _checks.quantize_static(x, scale, zero_point, bits, group_size, values=False)
    return x.new_empty(_q_shape(x.shape, bits), dtype=_q_dtype(bits))


@torch.library.register_fake("llmeasyquant::dequantize")
def _dequantize(q, scale, zero_point, bits, group_size, K, dtype):
    _checks.dequantize(q, scale, zero_point, bits, group_size, K, dtype)
    return q.new_empty([*q.shape[:-1], K], dtype=dtype)


@torch.library.register_fake("llmeasyquant::channel_stats_")
def _channel_stats(x, absmax, mn, mx):
    _checks.channel_stats_(x, absmax, mn, mx)
    return None


@torch.library.register_fake("llmeasyquant::ema_quantize_")
def _ema_quantize(x, state, alpha, eps, bits, symmetric, update):
    _checks.ema_quantize_(x, state, alpha, eps, bits)
    return (x.new_empty(_q_shape(x.shape, bits), dtype=_q_dtype(bits)),
            x.new_empty([1], dtype=torch.float32), x.new_empty([1], dtype=torch.int8))


@torch.library.register_fake("llmeasyquant::int8_gemm")
def _int8_gemm(a, b):
    _checks.int8_gemm(a, b)
    return a.new_empty([a.shape[0], b.shape[0]], dtype=torch.int32)


@torch.library.register_fake("llmeasyquant::scaled_int8_gemm")
def _scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, b_sum, bias, out_dtype):
    _checks.scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, b_sum, bias, out_dtype)
    return a.new_empty([a.shape[0], b.shape[0]], dtype=out_dtype)


@torch.library.register_fake("llmeasyquant::dynamic_quant_linear")
def _dynamic_quant_linear(x, w, w_scale, w_sum, bias, act_symmetric):
    _checks.dynamic_quant_linear(x, w, w_scale, w_sum, bias)
    return x.new_empty([*x.shape[:-1], w.shape[0]])


@torch.library.register_fake("llmeasyquant::dynamic_quant_linear_packed")
def _dynamic_quant_linear_packed(x, w_packed, w_scale, w_sum, in_features, out_features, bias, act_symmetric):
    _checks.dynamic_quant_linear_packed(x, w_packed, w_scale, w_sum, in_features, out_features, bias)
    return x.new_empty([*x.shape[:-1], out_features])


@torch.library.register_fake("llmeasyquant::weight_only_linear")
def _weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias):
    _checks.weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias)
    return x.new_empty([*x.shape[:-1], qw.shape[0]])


@torch.library.register_fake("llmeasyquant::w4a8_linear")
def _w4a8_linear(x, qw, w_scale, w_zero, group_size, bias):
    _checks.w4a8_linear(x, qw, w_scale, w_zero, group_size, bias)
    return x.new_empty([*x.shape[:-1], qw.shape[0]])


@torch.library.register_fake("llmeasyquant::w4a8_linear_packed")
def _w4a8_linear_packed(x, w_packed, gparams, in_features, out_features, group_size, bias):
    _checks.w4a8_linear_packed(x, w_packed, gparams, in_features, out_features, group_size, bias)
    return x.new_empty([*x.shape[:-1], out_features])


@torch.library.register_fake("llmeasyquant::hadamard_transform")
def _hadamard_transform(x, had_m, scale):
    _checks.hadamard_transform(x, had_m)
    return x.new_empty(x.shape)


@torch.library.register_fake("llmeasyquant::weight_only_linear_panel")
def _weight_only_linear_panel(x, qpanel, gparams, out_features, group_size, bias):
    _checks.weight_only_linear_panel(x, qpanel, gparams, out_features, group_size, bias)
    return x.new_empty([*x.shape[:-1], out_features])



@torch.library.register_fake("llmeasyquant::add_rms_norm")
def _add_rms_norm(x, residual, weight, eps):
    _checks.add_rms_norm(x, residual, weight, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("llmeasyquant::silu_mul")
def _silu_mul(gate, up):
    _checks.silu_mul(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.register_fake("llmeasyquant::decode_attention_")
def _decode_attention_(q, k, v, k_cache, v_cache, cos, sin, pos, scale):
    _checks.decode_attention_(q, k, v, k_cache, v_cache, cos, sin, pos)
    return q.new_empty(q.shape)
