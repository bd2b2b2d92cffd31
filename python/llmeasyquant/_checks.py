"""Argument checks of every op, in Python: one checker per op.

They mirror the C++ checks (src/cpp/torch/checks.h, op_checks.h) check for
check, in the same order, with the same messages and exception types
(``TORCH_CHECK`` -> RuntimeError, ``TORCH_CHECK_VALUE`` -> ValueError,
``TORCH_CHECK_TYPE`` -> TypeError), so a bad call fails the same way eagerly
(C++), under the fake kernels (torch.compile, meta tensors: ``_fake.py``), in
the PyTorch fallback (``_fallback.py``) and in the reference (``_reference.py``).

Shapes, dtypes and devices are checked everywhere. Values (static scales
finite and > 0, sub-8-bit zero-points in range) only where the data exists:
``values=True`` (the reference, the eager kernels and fallback), never under a fake.
Conditions go through ``torch._check*`` so symbolic shapes trace.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import panel
from .quant_format import SUPPORTED_BITS, packed_len, qrange

# c10::toString(ScalarType): the names the C++ messages print.
_C10_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
    torch.float16: "Half", torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 65536  # checks.h kMaxK: |acc| <= 255 * 128 * K must fit int32
CUDA_HADAMARD_MAX_N = 32768  # cuda_kernels.h kHadamardMaxN: one row in shared memory


def dtype_name(d: torch.dtype) -> str:
    return _C10_NAMES.get(d, str(d).removeprefix("torch."))


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(v)) if not isinstance(v, torch.SymInt) else str(v) for v in t.shape) + "]"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.9g}"
    return str(v)


# --------------------------------------------------------------------------
# checks.h
# --------------------------------------------------------------------------
def _is_cuda(dev: torch.device) -> bool:
    return dev.type == "cuda"


def check_device(op, name, t, dev):
    torch._check(t.device == dev, lambda: f"{op}: expected {name} on {dev} (where the input is), got {t.device}")


# Which bit widths a check accepts (the ``rule`` argument of the checkers):
KERNEL = "kernel"          # the op's kernels on the tensor's device (C++ check_bits); the fakes and the
                           # PyTorch fallback kernels follow it too, so eager, meta and compiled agree
ANY_DEVICE = "any_device"  # llmeasyquant.ops: 2, 3, 4, 8 everywhere (2/3 bits on CUDA run in PyTorch)
ORACLE = "oracle"          # the reference: 2 to 8 on any device (AWQ fake quantization and the KV cache use 5-7)
ORACLE_BITS = range(2, 9)
CUDA_KERNEL_BITS = (4, 8)


def kernel_bits(dev: torch.device) -> tuple[int, ...]:
    """Bit widths the compiled kernels take on ``dev``: 2- and 3-bit values
    have CPU kernels only (meta / fake tensors follow the CPU rules)."""
    return CUDA_KERNEL_BITS if _is_cuda(dev) else SUPPORTED_BITS


def check_bits(op, bits, dev, rule=KERNEL):
    if rule == ORACLE:
        torch._check_value(bits in ORACLE_BITS, lambda: f"{op}: unsupported bits={bits}; supported: 2 to 8")
    elif rule == ANY_DEVICE or not _is_cuda(dev):
        torch._check_value(bits in SUPPORTED_BITS, lambda: f"{op}: unsupported bits={bits}; supported: 2, 3, 4, 8")
    else:
        torch._check_value(bits in CUDA_KERNEL_BITS, lambda: (
            f"{op}: unsupported bits={bits} on this device; supported: 4, 8 "
            "(2- and 3-bit values have CPU kernels only)"))


def check_float(op, name, t):
    torch._check_type(t.dtype in _FLOATS, lambda: (
        f"{op}: expected {name} of dtype float32, bfloat16 or float16, got {dtype_name(t.dtype)}"))


def check_dtype(op, name, t, want):
    torch._check_type(t.dtype == want, lambda: (
        f"{op}: expected {name} of dtype {dtype_name(want)}, got {dtype_name(t.dtype)}"))


def check_numel(op, name, t, want, what):
    torch._check_value(t.numel() == want, lambda: (
        f"{op}: expected {name} with {want} elements ({what}), got shape {shape_str(t)}"))


def _divisors(K) -> str:
    K = int(K)
    return ", ".join(str(d) for d in range(1, K + 1) if K % d == 0)


def check_group_size(op, group_size, K):
    if group_size in (0, -1):
        return
    torch._check_value(group_size > 0, lambda: (
        f"{op}: group_size must be 0 (per tensor), -1 (per row) or a positive divisor of K, got {group_size}"))
    torch._check_value(K % group_size == 0, lambda: (
        f"{op}: group_size={group_size} does not divide K={K}; group sizes that divide K: {_divisors(K)}"))


def scale_shape(xs, group_size) -> list:
    if group_size == 0:
        return [1]
    return [*xs[:-1], 1 if group_size == -1 else xs[-1] // group_size]


def check_scale_shapes(op, xs, scale, zp, group_size):
    check_dtype(op, "scale", scale, torch.float32)
    check_dtype(op, "zero_point", zp, torch.int8)
    n = math.prod(scale_shape(xs, group_size))
    what = "one per tensor" if group_size == 0 else "one per row" if group_size == -1 else "one per group"
    check_numel(op, "scale", scale, n, what)
    check_numel(op, "zero_point", zp, n, what)


def check_scale_values(op, scale, zp, bits):
    s = scale.detach().reshape(-1).cpu()
    bad = ~(torch.isfinite(s) & (s > 0))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{op}: scales must be finite and > 0, got scale[{i}] = {float(s[i]):.9g}")
    if bits < 8:
        lo, hi = qrange(bits)
        z = zp.detach().reshape(-1).cpu()
        out = (z < lo) | (z > hi)
        if out.any():
            raise ValueError(f"{op}: {bits}-bit zero-points must lie in [{lo}, {hi}], got {int(z[out][0])}")


def check_gemm_shapes(op, a, b):
    check_dtype(op, "a", a, torch.int8)
    check_dtype(op, "b (weights)", b, torch.int8)
    torch._check_value(a.dim() == 2 and b.dim() == 2, lambda: (
        f"{op}: expected 2-D a [M, K] and b [N, K], got a {shape_str(a)} and b {shape_str(b)}"))
    torch._check_value(a.shape[1] == b.shape[1], lambda: (
        f"{op}: K mismatch: a is [M={a.shape[0]}, K={a.shape[1]}] but b is [N={b.shape[0]}, K={b.shape[1]}]"))
    torch._check_value(a.shape[1] <= MAX_K, lambda: f"{op}: K={a.shape[1]} exceeds the int32-exact limit {MAX_K}")


def check_out_dtype(op, d):
    torch._check_type(d in _FLOATS, lambda: f"{op}: out_dtype must be float32, bfloat16 or float16, got {dtype_name(d)}")


# --------------------------------------------------------------------------
# op_checks.h: one checker per op
# --------------------------------------------------------------------------
def _quant_input(op, x, bits, group_size, dev, rule=KERNEL):
    check_device(op, "x", x, dev)
    check_float(op, "x", x)
    check_bits(op, bits, dev, rule)
    torch._check_value(x.dim() >= 1, lambda: f"{op}: expected x with at least 1 dimension, got a scalar")
    check_group_size(op, group_size, x.shape[-1])


def _scales(op, xs, scale, zp, bits, group_size, dev, values):
    check_device(op, "scale", scale, dev)
    check_device(op, "zero_point", zp, dev)
    check_scale_shapes(op, xs, scale, zp, group_size)
    if values:
        check_scale_values(op, scale, zp, bits)


def _bias(op, bias, N, dev):
    if bias is None:
        return
    check_device(op, "bias", bias, dev)
    check_float(op, "bias", bias)
    check_numel(op, "bias", bias, N, "one per output channel")


def quantize(x, bits, symmetric, group_size, rule=KERNEL):
    op = "llmeasyquant.quantize"
    _quant_input(op, x, bits, group_size, x.device, rule)
    if group_size == 0:
        torch._check_value(x.numel() > 0, lambda: f"{op}: per-tensor quantization of an empty tensor {shape_str(x)}")


def quantize_static(x, scale, zero_point, bits, group_size, values=True, rule=KERNEL):
    op = "llmeasyquant.quantize_static"
    _quant_input(op, x, bits, group_size, x.device, rule)
    _scales(op, list(x.shape), scale, zero_point, bits, group_size, x.device, values)


def dequantize(q, scale, zero_point, bits, group_size, K, dtype, rule=KERNEL):
    op = "llmeasyquant.dequantize"
    dev = q.device
    check_device(op, "q", q, dev)
    check_bits(op, bits, dev, rule)
    torch._check_value(q.dim() >= 1, lambda: f"{op}: expected q with at least 1 dimension")
    torch._check_type(dtype in _FLOATS, lambda: f"{op}: dtype must be float32, bfloat16 or float16, got "
                                                f"{dtype_name(dtype)}")
    check_dtype(op, "q", q, torch.int8 if bits == 8 else torch.uint8)
    want = packed_len(K, bits) if K >= 0 else -1
    torch._check_value(K >= 0 and q.shape[-1] == want, lambda: (
        f"{op}: q of shape {shape_str(q)} does not hold K={K} {bits}-bit values (last dim should be {want})"))
    check_group_size(op, group_size, K)
    _scales(op, [*q.shape[:-1], K], scale, zero_point, bits, group_size, dev, False)


def channel_stats_(x, absmax, mn, mx):
    op = "llmeasyquant.channel_stats_"
    dev = x.device
    check_device(op, "x", x, dev)
    check_float(op, "x", x)
    torch._check_value(x.dim() >= 1, lambda: f"{op}: expected x with at least 1 dimension")
    K = x.shape[-1]
    for t in (absmax, mn, mx):
        check_device(op, "running statistics", t, dev)
        check_dtype(op, "running statistics", t, torch.float32)
        torch._check_value(t.dim() == 1 and t.shape[0] == K, lambda: (
            f"{op}: running statistics must have shape [{K}] (one per channel of x {shape_str(x)}), got "
            f"{shape_str(t)}"))
        torch._check_value(t.is_contiguous(), lambda: f"{op}: running statistics must be contiguous")


def ema_quantize_(x, state, alpha, eps, bits, rule=KERNEL):
    op = "llmeasyquant.ema_quantize_"
    dev = x.device
    _quant_input(op, x, bits, 0, dev, rule)
    check_device(op, "state", state, dev)
    check_dtype(op, "state", state, torch.float32)
    torch._check_value(state.dim() == 1 and state.shape[0] == 4 and state.is_contiguous(), lambda: (
        f"{op}: state must be a contiguous float32 tensor of shape [4] (absmax, min, max, steps), got "
        f"{shape_str(state)}"))
    torch._check_value(0.0 <= alpha < 1.0, lambda: f"{op}: alpha must be in [0, 1), got {_fmt(float(alpha))}")
    torch._check_value(eps > 0.0 and math.isfinite(eps), lambda: f"{op}: eps must be finite and > 0, got "
                                                                 f"{_fmt(float(eps))}")


def _gemm_operands(op, a, b):
    dev = a.device
    check_device(op, "a", a, dev)
    check_device(op, "b (weights)", b, dev)
    check_gemm_shapes(op, a, b)


def int8_gemm(a, b):
    _gemm_operands("llmeasyquant.int8_gemm", a, b)


def scaled_int8_gemm(a, a_scale, a_zero: Optional[torch.Tensor], b, b_scale, b_sum: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], out_dtype):
    op = "llmeasyquant.scaled_int8_gemm"
    dev = a.device
    _gemm_operands(op, a, b)
    M, N = a.shape[0], b.shape[0]
    check_out_dtype(op, out_dtype)
    check_device(op, "a_scale", a_scale, dev)
    check_device(op, "b_scale", b_scale, dev)
    check_dtype(op, "a_scale", a_scale, torch.float32)
    check_dtype(op, "b_scale", b_scale, torch.float32)
    torch._check_value(a_scale.numel() == M or a_scale.numel() == 1, lambda: (
        f"{op}: a_scale must have M={M} elements (per token) or 1 (per tensor), got {shape_str(a_scale)}"))
    check_numel(op, "b_scale", b_scale, N, "one per output channel")
    if a_zero is not None:
        check_device(op, "a_zero", a_zero, dev)
        check_dtype(op, "a_zero", a_zero, torch.int8)
        torch._check_value(a_zero.numel() == M or a_zero.numel() == 1, lambda: (
            f"{op}: a_zero must have M={M} elements or 1, got {shape_str(a_zero)}"))
    if b_sum is not None:
        check_device(op, "b_sum", b_sum, dev)
        check_dtype(op, "b_sum", b_sum, torch.int32)
        check_numel(op, "b_sum", b_sum, N, "sum_k b[n, k] per output channel")
    _bias(op, bias, N, dev)


def _channel_params(op, w_scale, w_sum, N, dev):
    """The W8A8 linears' per-channel parameters: fp32 scales and int32 row sums, N each."""
    check_device(op, "w_scale", w_scale, dev)
    check_device(op, "w_sum", w_sum, dev)
    check_dtype(op, "w_scale", w_scale, torch.float32)
    check_dtype(op, "w_sum", w_sum, torch.int32)
    check_numel(op, "w_scale", w_scale, N, "one per output channel")
    check_numel(op, "w_sum", w_sum, N, "sum_k w[n, k] per output channel")


def dynamic_quant_linear(x, w, w_scale, w_sum, bias):
    op = "llmeasyquant.dynamic_quant_linear"
    dev = x.device
    check_device(op, "x", x, dev)
    check_float(op, "x", x)
    torch._check_value(x.dim() >= 1, lambda: f"{op}: expected x with at least 1 dimension")
    check_device(op, "w", w, dev)
    check_dtype(op, "w", w, torch.int8)
    torch._check_value(w.dim() == 2, lambda: f"{op}: expected a 2-D weight, got {shape_str(w)}")
    torch._check_value(x.shape[-1] == w.shape[1], lambda: (
        f"{op}: K mismatch: x has K={x.shape[-1]} (shape {shape_str(x)}) but the weight has K={w.shape[1]} "
        f"(shape {shape_str(w)})"))
    N, K = w.shape
    torch._check_value(K <= MAX_K, lambda: f"{op}: K={K} exceeds the int32-exact limit {MAX_K}")
    _channel_params(op, w_scale, w_sum, N, dev)
    _bias(op, bias, N, dev)


def _packed_x(op, x, in_features, out_features):
    """The pre-packed layouts pad K and N: the packed ops take both, and x
    must have K = in_features (C++: op_checks.h check_packed_x)."""
    check_device(op, "x", x, x.device)
    check_float(op, "x", x)
    torch._check_value(x.dim() >= 1, lambda: f"{op}: expected x with at least 1 dimension")
    torch._check_value(in_features >= 0 and out_features >= 0, lambda: (
        f"{op}: expected in_features, out_features >= 0, got {in_features}, {out_features}"))
    torch._check_value(x.shape[-1] == in_features, lambda: (
        f"{op}: K mismatch: x has K={x.shape[-1]} (shape {shape_str(x)}) but the weight has K={in_features} "
        f"(in_features)"))
    torch._check_value(in_features <= MAX_K, lambda: f"{op}: K={in_features} exceeds the int32-exact limit {MAX_K}")


def dynamic_quant_linear_packed(x, w_packed, w_scale, w_sum, in_features, out_features, bias):
    """dynamic_quant_linear's rules with the weight in the CPU panel layout
    (C++: op_checks.h check_dynamic_linear_packed_args)."""
    from .cpu_pack import packed_shape

    op = "llmeasyquant.dynamic_quant_linear_packed"
    _packed_x(op, x, in_features, out_features)
    dev, N, K = x.device, out_features, in_features
    _channel_params(op, w_scale, w_sum, N, dev)
    check_device(op, "w_packed", w_packed, dev)
    check_dtype(op, "w_packed", w_packed, torch.int8)
    want = packed_shape(N, K)
    torch._check_value(w_packed.dim() == 2 and tuple(w_packed.shape) == want, lambda: (
        f"{op}: expected w_packed of shape [{want[0]}, {want[1]}] (the panel layout of an [N={N}, K={K}] "
        f"weight: llmeasyquant.cpu_pack), got {shape_str(w_packed)}"))
    _bias(op, bias, N, dev)


def weight_only_linear(x, qw, scale, zero_point, bits, group_size, bias, rule=KERNEL):
    _weight_linear("llmeasyquant.weight_only_linear", x, qw, scale, zero_point, bits, group_size, bias, rule)


def w4a8_linear(x, qw, w_scale, w_zero, group_size, bias):
    """weight_only_linear's rules at 4 bits (C++: op_checks.h check_w4a8_args),
    K within the int32-exact limit of the group products."""
    op = "llmeasyquant.w4a8_linear"
    _weight_linear(op, x, qw, w_scale, w_zero, 4, group_size, bias, KERNEL)
    K = x.shape[-1]
    torch._check_value(K <= MAX_K, lambda: f"{op}: K={K} exceeds the int32-exact limit {MAX_K}")


def w4a8_linear_packed(x, w_packed, gparams, in_features, out_features, group_size, bias):
    """The weight in the CPU's pre-packed W4A8 layout (C++: op_checks.h
    check_w4a8_packed_args)."""
    from .cpu_pack import w4a8_packed_shapes

    op = "llmeasyquant.w4a8_linear_packed"
    _packed_x(op, x, in_features, out_features)
    dev, K = x.device, in_features
    torch._check_value(group_size != 0, lambda: (
        f"{op}: expected per-channel (-1) or group-wise (g > 0) weight scales, got group_size=0 (per tensor)"))
    check_group_size(op, group_size, K)
    G = K // group_size if group_size > 0 else 1
    wshape, gshape = w4a8_packed_shapes(out_features, K, G)
    check_device(op, "w_packed", w_packed, dev)
    check_dtype(op, "w_packed", w_packed, torch.uint8)
    torch._check_value(w_packed.dim() == 2 and tuple(w_packed.shape) == wshape, lambda: (
        f"{op}: expected w_packed of shape [{wshape[0]}, {wshape[1]}] (the W4A8 layout of an [N={out_features}, "
        f"K={K}] weight: llmeasyquant.cpu_pack.pack_w4a8), got {shape_str(w_packed)}"))
    check_device(op, "gparams", gparams, dev)
    check_dtype(op, "gparams", gparams, torch.float32)
    torch._check_value(gparams.dim() == 4 and tuple(gparams.shape) == gshape, lambda: (
        f"{op}: expected gparams of shape [{gshape[0]}, {gshape[1]}, 2, 16], got {shape_str(gparams)}"))
    _bias(op, bias, out_features, dev)


def _weight_linear(op, x, qw, scale, zero_point, bits, group_size, bias, rule):
    dev = x.device
    check_device(op, "x", x, dev)
    check_float(op, "x", x)
    check_bits(op, bits, dev, rule)
    torch._check_value(x.dim() >= 1, lambda: f"{op}: expected x with at least 1 dimension")
    check_device(op, "qw", qw, dev)
    check_dtype(op, "qw", qw, torch.int8 if bits == 8 else torch.uint8)
    K = x.shape[-1]
    kq = packed_len(K, bits)
    torch._check_value(qw.dim() == 2 and qw.shape[1] == kq, lambda: (
        f"{op}: K mismatch: x has K={K} (shape {shape_str(x)}) but the {bits}-bit weight has shape "
        f"{shape_str(qw)} (expected [N, {kq}])"))
    torch._check_value(group_size != 0, lambda: (
        f"{op}: expected per-channel (-1) or group-wise (g > 0) weight scales, got group_size=0 (per tensor)"))
    check_group_size(op, group_size, K)
    N = qw.shape[0]
    check_device(op, "scale", scale, dev)
    if zero_point is not None:
        check_device(op, "zero_point", zero_point, dev)
        check_scale_shapes(op, [N, K], scale, zero_point, group_size)
    else:  # the C++ side checks a zero tensor shaped like scale
        check_scale_shapes(op, [N, K], scale, torch.empty(scale.shape, dtype=torch.int8, device="meta"), group_size)
    _bias(op, bias, N, dev)


def hadamard_transform(x, had_m: Optional[torch.Tensor], rule=KERNEL) -> int:
    """Returns m (1 without had_m). ``rule``: KERNEL adds the CUDA kernel's
    row-length limit; ops.py (ANY_DEVICE) runs longer rows in PyTorch."""
    op = "llmeasyquant.hadamard_transform"
    dev = x.device
    check_device(op, "x", x, dev)
    check_float(op, "x", x)
    torch._check_value(x.dim() >= 1, lambda: f"{op}: expected x with at least 1 dimension, got a scalar")
    m = 1
    if had_m is not None:
        check_device(op, "had_m", had_m, dev)
        check_dtype(op, "had_m", had_m, torch.float32)
        torch._check_value(had_m.dim() == 2 and had_m.shape[0] == had_m.shape[1] and had_m.shape[0] >= 1, lambda: (
            f"{op}: expected had_m a square 2-D matrix [m, m], got {shape_str(had_m)}"))
        m = had_m.shape[0]
    n = x.shape[-1]
    p = n // m
    torch._check_value(n % m == 0 and p >= 1 and (p & (p - 1)) == 0, lambda: (
        f"{op}: expected the last dim of x to be m * 2**k with m = {m}"
        f"{' (the size of had_m)' if had_m is not None else ' (no had_m)'}, got {n} (x {shape_str(x)})"))
    if rule == KERNEL and _is_cuda(dev):
        torch._check_value(n <= CUDA_HADAMARD_MAX_N, lambda: (
            f"{op}: the CUDA kernel takes rows of at most {CUDA_HADAMARD_MAX_N} values (one row in shared memory), "
            f"got {n}; llmeasyquant.ops.hadamard_transform runs longer rows in PyTorch"))
    return m


def weight_only_linear_panel(x, qpanel, gparams, out_features: int, group_size: int, bias) -> None:
    """The panel op (C++: op_checks.h check_panel_args): x bf16/fp16 [..., K],
    K % 16 == 0, the shapes :mod:`llmeasyquant.panel` makes."""
    op = "llmeasyquant.weight_only_linear_panel"
    dev = x.device
    check_device(op, "x", x, dev)
    torch._check_value(x.dtype in (torch.bfloat16, torch.float16), lambda: (
        f"{op}: expected x bfloat16 or float16 (a 16-bit kernel), got {x.dtype}"))
    torch._check_value(x.dim() >= 1, lambda: f"{op}: expected x with at least 1 dimension")
    K = x.shape[-1]
    torch._check_value(K > 0 and K % 16 == 0, lambda: (
        f"{op}: expected K (the last dim of x) a positive multiple of 16, got {K} (x {shape_str(x)})"))
    torch._check_value(out_features >= 0, lambda: f"{op}: expected out_features >= 0, got {out_features}")
    torch._check_value(panel.supported(K, group_size), lambda: (
        f"{op}: expected group_size -1, K or a multiple of 64 dividing K={K}, got {group_size}"))
    g = K if group_size == -1 else group_size
    check_device(op, "qpanel", qpanel, dev)
    check_dtype(op, "qpanel", qpanel, torch.int32)
    P, K16 = -(-out_features // 64), -(-K // 64) * 4
    torch._check_value(tuple(qpanel.shape) == (P, K16, 32, 4), lambda: (
        f"{op}: expected qpanel of shape [{P}, {K16}, 32, 4] for out_features={out_features}, K={K}, "
        f"got {shape_str(qpanel)}"))
    check_device(op, "gparams", gparams, dev)
    check_dtype(op, "gparams", gparams, torch.float32)
    torch._check_value(tuple(gparams.shape) == (P, K // g, 2, 8, 8), lambda: (
        f"{op}: expected gparams of shape [{P}, {K // g}, 2, 8, 8] for out_features={out_features}, K={K}, "
        f"group size {g}, got {shape_str(gparams)}"))
    _bias(op, bias, out_features, dev)



# --------------------------------------------------------------------------
# decode-step glue (C++: op_checks.h check_add_rms_norm_args, ...)
# --------------------------------------------------------------------------
def add_rms_norm(x, residual, weight, eps: float) -> None:
    op = "llmeasyquant.add_rms_norm"
    dev = x.device
    check_device(op, "x", x, dev)
    check_float(op, "x", x)
    torch._check_value(x.dim() >= 1 and x.shape[-1] >= 1, lambda: (
        f"{op}: expected x with at least 1 dimension and a non-empty last dim, got {shape_str(x)}"))
    if residual is not None:
        check_device(op, "residual", residual, dev)
        check_dtype(op, "residual", residual, x.dtype)
        torch._check_value(residual.shape == x.shape, lambda: (
            f"{op}: expected residual of x's shape {shape_str(x)}, got {shape_str(residual)}"))
    check_device(op, "weight", weight, dev)
    check_dtype(op, "weight", weight, x.dtype)
    torch._check_value(weight.dim() == 1 and weight.shape[0] == x.shape[-1], lambda: (
        f"{op}: expected weight of shape [{x.shape[-1]}] (the last dim of x), got {shape_str(weight)}"))
    torch._check_value(eps >= 0.0 and math.isfinite(eps), lambda: (
        f"{op}: expected a finite eps >= 0, got {_fmt(float(eps))}"))


def silu_mul(gate, up) -> None:
    op = "llmeasyquant.silu_mul"
    dev = gate.device
    check_device(op, "gate", gate, dev)
    check_float(op, "gate", gate)
    check_device(op, "up", up, dev)
    check_dtype(op, "up", up, gate.dtype)
    torch._check_value(gate.dim() >= 1, lambda: f"{op}: expected gate with at least 1 dimension, got a scalar")
    torch._check_value(up.shape == gate.shape, lambda: (
        f"{op}: expected up of gate's shape {shape_str(gate)}, got {shape_str(up)}"))


def decode_attention_(q, k, v, k_cache, v_cache, cos, sin, pos: int) -> tuple[int, int, int, int]:
    """Returns (heads, kv_heads, max_pos, head_dim)."""
    op = "llmeasyquant.decode_attention_"
    dev = q.device
    check_device(op, "q", q, dev)
    check_float(op, "q", q)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_device(op, name, t, dev)
        check_dtype(op, name, t, q.dtype)
    torch._check_value(k_cache.dim() == 4 and v_cache.shape == k_cache.shape and k_cache.shape[3] >= 2
                       and k_cache.shape[3] % 2 == 0, lambda: (
        f"{op}: expected k_cache and v_cache of one shape [batch, kv_heads, max_pos, head_dim] with an even "
        f"head_dim, got {shape_str(k_cache)} and {shape_str(v_cache)}"))
    torch._check_value(k_cache.is_contiguous() and v_cache.is_contiguous(), lambda: (
        f"{op}: expected contiguous k_cache and v_cache (written in place)"))
    B, Hkv, S, D = k_cache.shape
    torch._check_value(q.dim() == 2 and q.shape[0] == B and q.shape[1] >= D and q.shape[1] % (Hkv * D) == 0,
                       lambda: (f"{op}: expected q of shape [{B}, heads * {D}] with heads a multiple of "
                                f"kv_heads={Hkv} (the caches' {shape_str(k_cache)}), got {shape_str(q)}"))
    for name, t in (("k", k), ("v", v)):
        torch._check_value(t.dim() == 2 and t.shape[0] == B and t.shape[1] == Hkv * D, lambda: (
            f"{op}: expected {name} of shape [{B}, {Hkv * D}] (kv_heads * head_dim), got {shape_str(t)}"))
    torch._check_value(0 <= pos < S, lambda: f"{op}: expected 0 <= pos < max_pos={S}, got pos={pos}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_device(op, name, t, dev)
        check_dtype(op, name, t, torch.float32)
        torch._check_value(t.dim() == 1 and t.shape[0] == D, lambda: (
            f"{op}: expected {name} of shape [{D}] (head_dim), got {shape_str(t)}"))
    return q.shape[1] // D, Hkv, S, D
