"""Pure-PyTorch reference for every op of LLMEasyQuant: the test oracle.

This file *defines* the ops' semantics. The C++ (and CUDA) kernels and the
PyTorch fallback (``_fallback.py``) are tested against it, bit-for-bit where
the math is integer or the same IEEE float operations happen in the same
order, and within tolerances otherwise. The integer format it is built from
(ranges, scale rules, rounding, packed layouts) is :mod:`llmeasyquant.quant_format`,
which production code uses directly. Production code does not import this
module; the methods and the search still reach the format's names through
the re-exports below until they import ``quant_format`` themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks, hadamard
from .quant_format import (SCALE_DTYPES, SUPPORTED_BITS, group_view, pack_bits, pack_int4,  # noqa: F401
                           packed_len, qrange, quantize_values, scale_dtype_of, scale_from_absmax,
                           scale_zp_from_minmax, storable_scale, unpack_bits, unpack_int4)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _nan_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(a), a, torch.maximum(a, b))


def _scale_shape(x_shape: torch.Size, group_size: int) -> tuple[int, ...]:
    if group_size == 0:
        return (1,)
    if group_size == -1:
        return (*x_shape[:-1], 1)
    return (*x_shape[:-1], x_shape[-1] // group_size)


def _finish(qg, x_shape, bits):
    return pack_bits(qg.reshape(x_shape), bits)


# --------------------------------------------------------------------------
# ops. Each public op first runs its argument checker (_checks.py: the same
# checks and messages as the C++ kernels and the fakes), then the math.
# --------------------------------------------------------------------------
def _reduce(t: torch.Tensor, kind: str) -> torch.Tensor:
    """amax / amin over the last dim; an empty dim (K = 0) gives the
    kernels' starting values: absmax 0, min +inf, max -inf."""
    if t.shape[-1] == 0:
        fill = {"absmax": 0.0, "min": float("inf"), "max": float("-inf")}[kind]
        return torch.full(t.shape[:-1], fill, dtype=t.dtype, device=t.device)
    return t.amin(dim=-1) if kind == "min" else t.amax(dim=-1)


def _quantize(x, bits, symmetric, group_size, scale_dtype=torch.float32):
    xf = x.float()
    xg = group_view(xf, group_size)
    if symmetric:
        amax = _reduce(xg.abs(), "absmax")
        scale = scale_from_absmax(amax, bits, scale_dtype)
        zp = torch.zeros_like(scale, dtype=torch.int8)
    else:
        scale, zp = scale_zp_from_minmax(_reduce(xg, "min"), _reduce(xg, "max"), bits, scale_dtype)
    qg = quantize_values(xg, scale, zp, bits)
    shape = _scale_shape(x.shape, group_size)
    return _finish(qg, x.shape, bits), scale.reshape(shape), zp.reshape(shape)


def quantize(x: torch.Tensor, bits: int, symmetric: bool, group_size: int,
             scale_dtype: torch.dtype = torch.float32):
    """Dynamic quantization: returns (q, scale, zero_point); scales float32,
    rounded to ``scale_dtype`` first (float16 weight scales)."""
    _checks.quantize(x, bits, symmetric, group_size, rule=_checks.ORACLE)
    return _quantize(x, bits, symmetric, group_size, scale_dtype)


def _quantize_static(x, scale, zero_point, bits, group_size):
    xf = x.float()
    xg = group_view(xf, group_size)
    s = scale.float().reshape(xg.shape[:-1])
    z = zero_point.reshape(xg.shape[:-1])
    return _finish(quantize_values(xg, s, z, bits), x.shape, bits)


def quantize_static(x, scale, zero_point, bits: int, group_size: int):
    """Quantize with given scales/zero-points (same granularity rules)."""
    _checks.quantize_static(x, scale, zero_point, bits, group_size, rule=_checks.ORACLE)
    return _quantize_static(x, scale, zero_point, bits, group_size)


def _dequantize(q, scale, zero_point, bits, group_size, K, dtype):
    qi = unpack_bits(q, bits, K)
    qg = group_view(qi.float(), group_size)
    s = scale.float().reshape(qg.shape[:-1]).unsqueeze(-1)
    z = zero_point.float().reshape(qg.shape[:-1]).unsqueeze(-1)
    return (s * (qg - z)).reshape(qi.shape).to(dtype)


def dequantize(q, scale, zero_point, bits: int, group_size: int, K: int, dtype):
    """The op's semantics; as oracle extensions the reference also returns
    float64 (for fp64 comparisons) and takes 5-7 bits, which the kernels do not."""
    _checks.dequantize(q, scale, zero_point, bits, group_size, K, torch.float32 if dtype == torch.float64 else dtype,
                       rule=_checks.ORACLE)
    return _dequantize(q, scale, zero_point, bits, group_size, K, dtype)


def channel_stats_(x, absmax, mn, mx) -> None:
    """Fold per-channel (last dim) statistics of x into running stats, in place."""
    _checks.channel_stats_(x, absmax, mn, mx)
    xf = x.float().reshape(-1, x.shape[-1]) if x.shape[-1] else x.float().reshape(0, 0)
    if xf.shape[0] == 0:
        return
    absmax.copy_(_nan_max(xf.abs().amax(0), absmax))
    mx.copy_(_nan_max(xf.amax(0), mx))
    mn.copy_(-_nan_max(-xf.amin(0), -mn))


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def ema_quantize_(x, state, alpha: float, eps: float, bits: int, symmetric: bool, update: bool):
    """Online EMA activation scales (paper Algorithm 1 / eq. 2).

    state: float32 [4] = (absmax_ema, min_ema, max_ema, steps). The first
    update initialises the EMA with the observation (no bias towards 0):
      delta_t = alpha * delta_{t-1} + (1 - alpha) * max(eps, absmax(X_t))
    Asymmetric mode tracks min/max the same way (each widened to contain 0,
    eps applied to the range) and derives the zero-point from them; this
    replaces the paper's -round(mu/delta), which is not a valid zero-point
    for an absmax-sized range.

    Non-finite observations are skipped: a batch whose min or max is not
    finite (NaN / +-Inf anywhere), or whose update would make the state
    non-finite, leaves ``state`` untouched (``steps`` not incremented: a
    caller sees a skipped observation as ``steps`` unchanged after an update
    call). The batch is still quantized with the existing state; with no
    state yet (steps == 0) it gets the scale of its own observation, which is
    NaN / Inf, so the output is visibly not finite and the state stays
    uninitialised. A state that is already non-finite (saved before this rule)
    is re-initialised by the next finite observation.
    Returns (q, scale [1], zero_point [1]) computed with the *updated* state.
    """
    _checks.ema_quantize_(x, state, alpha, eps, bits, rule=_checks.ORACLE)
    xf = x.float()
    src = state
    if update:
        a = torch.tensor(alpha, dtype=torch.float32)
        b = torch.tensor(1.0 - alpha, dtype=torch.float32)
        e = torch.tensor(eps, dtype=torch.float32)
        if xf.numel():
            mn_x, mx_x = xf.amin().cpu(), xf.amax().cpu()
            r = _nan_max(xf.abs().amax().cpu(), e)
        else:
            mn_x = mx_x = torch.zeros(())
            r = e
        lo = torch.minimum(mn_x, torch.zeros(()))
        hi = torch.maximum(mx_x, torch.zeros(()))
        st = state.detach().cpu()
        first = bool(st[3] == 0) or not _finite(st[:3])
        obs = torch.stack([r, lo, hi])
        new = obs if first else a * st[:3] + b * obs
        if _finite(mn_x) and _finite(mx_x) and _finite(new):
            state[:3] = new.to(state.device)
            state[3] = state[3] + 1
        elif bool(st[3] == 0):
            src = obs.to(state.device)  # nothing to fall back on: this batch's own (non-finite) range
    if symmetric:
        scale = scale_from_absmax(src[0:1], bits)
        zp = torch.zeros(1, dtype=torch.int8, device=state.device)
    else:
        e = torch.tensor(eps, dtype=torch.float32, device=state.device)
        lo, hi = src[1:2], src[2:3]
        # the range gets the same eps floor as the symmetric absmax
        hi = torch.maximum(hi, lo + e)
        scale, zp = scale_zp_from_minmax(lo, hi, bits)
    q = _quantize_static(x, scale.to(x.device), zp.to(x.device), bits, 0)
    return q, scale, zp


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M,K] x int8 [N,K] -> exact int32 [M,N]."""
    _checks.int8_gemm(a, b)
    return (a.long() @ b.long().T).to(torch.int32)


def _check_row_sums(op: str, name: str, wname: str, w: torch.Tensor, sums: torch.Tensor) -> None:
    """The row-sum cache must be exactly sum_k w[n, k] (value check: the
    kernels trust it, so only the oracle verifies it)."""
    true = w.long().sum(1)
    bad = (sums.reshape(-1).long() != true).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{op}: expected {name}[n] = sum_k {wname}[n, k] (ops.weight_row_sums({wname})), got "
                         f"{name}[{i}] = {int(sums.reshape(-1)[i])} for a row summing to {int(true[i])}")


def _scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, bias, out_dtype):
    acc = a.long() @ b.long().T
    if a_zero is not None:
        acc = acc - a_zero.reshape(-1, 1).long() * b.long().sum(1).reshape(1, -1)
    acc = acc.to(torch.int32)
    s = a_scale.float().reshape(-1, 1) * b_scale.float().reshape(1, -1)
    out = s * acc.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, b_sum, bias, out_dtype):
    """(a_scale[m] * b_scale[n]) * (acc[m,n] - a_zero[m] * sum_k b[n,k]) + bias[n].

    ``b_sum`` is never a parameter of the math: it is the cache of
    ``sum_k b[n, k]`` (``ops.weight_row_sums(b)``, kept once per weight as
    ``QLinear.w_sum``) that saves the kernels a pass over ``b``. The kernels
    trust it wherever the row sums enter: the zero-point correction, and on
    x86 also the internal +128 activation offset, with or without a
    zero-point. So it must be exact; giving it never changes the result.
    The reference verifies it (ValueError), the kernels do not (checking
    would cost the pass it saves).
    """
    _checks.scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, b_sum, bias, out_dtype)
    if b_sum is not None:
        _check_row_sums("llmeasyquant.scaled_int8_gemm", "b_sum", "b", b, b_sum)
    return _scaled_int8_gemm(a, a_scale, a_zero, b, b_scale, bias, out_dtype)


def dynamic_quant_linear(x, w, w_scale, w_sum, bias, act_symmetric: bool):
    """Paper Algorithm 2: per-token dynamic quantize + int8 GEMM, float in/out.
    ``w_sum`` is the exact row-sum cache of ``w`` (see :func:`scaled_int8_gemm`)."""
    _checks.dynamic_quant_linear(x, w, w_scale, w_sum, bias)
    _check_row_sums("llmeasyquant.dynamic_quant_linear", "w_sum", "w", w, w_sum)
    K = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), K)  # explicit rows: K = 0 cannot infer -1
    q, s, z = _quantize(x2, 8, act_symmetric, -1)
    out = _scaled_int8_gemm(q, s, None if act_symmetric else z, w, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], w.shape[0])


def dynamic_quant_linear_packed(x, w_packed, w_scale, w_sum, in_features: int, out_features: int, bias,
                                act_symmetric: bool):
    """:func:`dynamic_quant_linear` of the weight held in the CPU panel layout
    (:mod:`llmeasyquant.cpu_pack`): the same numbers, bit for bit."""
    from .cpu_pack import unpack_int8_panels

    _checks.dynamic_quant_linear_packed(x, w_packed, w_scale, w_sum, in_features, out_features, bias)
    w = unpack_int8_panels(w_packed, out_features, in_features)
    return dynamic_quant_linear(x, w, w_scale, w_sum, bias, act_symmetric)


def weight_only_linear(x, qw, scale, zero_point, bits: int, group_size: int, bias):
    """Weight-only quantized linear (W8A16 / W4A16): fp32 math, x.dtype out."""
    _checks.weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias, rule=_checks.ORACLE)
    K = x.shape[-1]
    N = qw.shape[0]
    zp = zero_point if zero_point is not None else torch.zeros_like(scale, dtype=torch.int8)
    w = _dequantize(qw, scale, zp, bits, group_size, K, torch.float32)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


def w4a8_linear_packed(x, w_packed, gparams, in_features: int, out_features: int, group_size: int, bias):
    """:func:`w4a8_linear` of the weight held in the CPU's pre-packed W4A8 layout
    (:func:`llmeasyquant.cpu_pack.pack_w4a8`): the same numbers, bit for bit."""
    from .cpu_pack import unpack_w4a8

    _checks.w4a8_linear_packed(x, w_packed, gparams, in_features, out_features, group_size, bias)
    q, s, z = unpack_w4a8(w_packed, gparams, out_features, in_features)
    return w4a8_linear(x, pack_int4(q), s, z, group_size, bias)


def w4a8_linear(x, qw, w_scale, w_zero, group_size: int, bias):
    """W4A8: per-token symmetric 8-bit activations ``a = q_a * s_a`` x 4-bit
    group-wise weights ``s * (q - z)``. Each group's product is an exact
    integer ``P[m, n, g] = sum_{k in g} q_a[m, k] * (q[n, k] - z[n, g])``;
    then in fp32, every operation rounded on its own:
    ``acc = acc + s[n, g] * float(P)`` over the groups in order,
    ``out = s_a[m] * acc + bias[n]``, x.dtype out. The same real number as
    quantize -> dequantize -> weight_only_linear, with fewer roundings."""
    _checks.w4a8_linear(x, qw, w_scale, w_zero, group_size, bias)
    K, N = x.shape[-1], qw.shape[0]
    x2 = x.reshape(math.prod(x.shape[:-1]), K)
    M = x2.shape[0]
    acc = torch.zeros(M, N, dtype=torch.float32)
    if K > 0 and M > 0 and N > 0:
        g = K if group_size == -1 else group_size
        G = K // g
        qa, sa, _ = _quantize(x2.cpu(), 8, True, -1)
        w = unpack_int4(qw.cpu(), K).long().reshape(N, G, g)
        if w_zero is not None:
            w = w - w_zero.cpu().long().reshape(N, G, 1)
        P = (qa.long().reshape(M, 1, G, g) * w.reshape(1, N, G, g)).sum(-1)  # int64 [M, N, G]
        s = w_scale.cpu().float().reshape(N, G)
        for gi in range(G):
            acc = acc + s[:, gi] * P[:, :, gi].float()
        acc = sa.reshape(M, 1) * acc
    if bias is not None:
        acc = acc + bias.cpu().float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], N).to(x.device)


def hadamard_transform(x, had_m, scale: float, dtype=None):
    """``scale * x @ kron(had_m, S_p)^T`` along the last dim, as one dense
    float64 product (``S_p`` the natural-order Sylvester matrix of ``p = n / m``;
    ``had_m`` None for ``m = 1``). Returns ``dtype`` (default ``x.dtype``;
    float64 for the error bound of a comparison)."""
    m = _checks.hadamard_transform(x, had_m, rule=_checks.ANY_DEVICE)
    n = x.shape[-1]
    hm = torch.ones(1, 1, dtype=torch.float64) if had_m is None else had_m.detach().double().cpu()
    Q = torch.kron(hm, hadamard.sylvester(n // m)).to(x.device)
    y = (x.double() @ Q.T) * scale
    return y.to(x.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------
# decode-step glue: HF's LLaMA arithmetic (modeling_llama.py), float32 inside
# --------------------------------------------------------------------------
def add_rms_norm(x, residual, weight, eps: float):
    """``(weight * (s * rsqrt(mean(s^2) + eps)).to(dtype), s)`` with ``s = x +
    residual`` in x's dtype (``s = x`` without residual): LlamaRMSNorm after
    the residual add."""
    _checks.add_rms_norm(x, residual, weight, eps)
    s = x + residual if residual is not None else x.clone()
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), s


def silu_mul(gate, up):
    """``silu(gate) * up`` in gate's dtype (LlamaMLP's ``act_fn(gate) * up``)."""
    _checks.silu_mul(gate, up)
    return F.silu(gate) * up


def _rotate_half_rope(x, cos, sin):
    # HF's apply_rotary_pos_emb for one position, in float32
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


def decode_attention_(q, k, v, k_cache, v_cache, cos, sin, pos: int, scale: float):
    """One decode position: writes RoPE(k) (in the caches' dtype) and v into
    ``k_cache`` / ``v_cache`` [B, Hkv, S, D] at ``pos`` and returns [B, H*D]
    softmax(scale * RoPE(q) K^T) V over positions 0..pos, query head h
    reading KV head h // (H / Hkv) (GQA); float32 arithmetic, q's dtype out."""
    H, Hkv, _, D = _checks.decode_attention_(q, k, v, k_cache, v_cache, cos, sin, pos)
    B = q.shape[0]
    k_cache[:, :, pos] = _rotate_half_rope(k.float().reshape(B, Hkv, D), cos, sin).to(k_cache.dtype)
    v_cache[:, :, pos] = v.reshape(B, Hkv, D)
    qr = _rotate_half_rope(q.float().reshape(B, H, D), cos, sin)
    K = k_cache[:, :, :pos + 1].float().repeat_interleave(H // Hkv, dim=1)  # [B, H, L, D]
    V = v_cache[:, :, :pos + 1].float().repeat_interleave(H // Hkv, dim=1)
    p = torch.softmax((K @ qr.unsqueeze(-1)).squeeze(-1) * scale, dim=-1)  # [B, H, L]
    return (p.unsqueeze(-2) @ V).squeeze(-2).reshape(B, H * D).to(q.dtype)
