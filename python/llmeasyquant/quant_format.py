"""The integer format: ranges, scale rules, packed layouts.

Everything that decides *which* integers and scales represent a float tensor,
and how they sit in memory. The ops (C++/CUDA kernels, the PyTorch fallback
``_fallback.py``), ``QLinear``, the methods and the KV cache all follow these
rules; the test oracle (``_reference.py``) builds the ops' semantics from them.

* Quantized values are signed integers ``q`` in ``[qmin, qmax] =
  [-2**(bits-1), 2**(bits-1) - 1]``; dequantization is
  ``x = scale * (q - zero_point)``.
* Symmetric (AbsMax): ``scale = absmax / qmax``, ``zero_point = 0``.
* Asymmetric (ZeroPoint, min/max): the range is widened to contain 0 so that
  zero is exact, ``scale = (hi - lo) / (2**bits - 1)`` (``hi/(2**bits - 1) -
  lo/(2**bits - 1)`` where ``hi - lo`` overflows float32, so finite inputs
  always get a finite scale),
  ``zero_point = clamp(qmin - round(lo / scale), qmin, qmax)``.
* A zero range gives ``scale = 1`` (all values quantize to the zero-point).
  NaN inputs give a NaN scale, so outputs are NaN rather than silently finite.
* ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``, with a
  NaN quotient mapped to 0. Division (not multiplication by a reciprocal) is
  used everywhere so kernels can reproduce it exactly.
* Granularity ``group_size``: ``0`` per tensor (scale shape ``[1]``),
  ``-1`` per row (per output channel for weights, per token for activations;
  scale shape ``[..., 1]``), ``g > 0`` group-wise along the last dim
  (scale shape ``[..., K // g]``; ``g`` must divide ``K``).
* 8-bit values are int8. 4-bit values are packed two per byte along the last
  dim: element ``2i`` in the low nibble, ``2i + 1`` in the high nibble, as
  two's-complement nibbles; odd ``K`` leaves the final high nibble 0. Other
  widths: an LSB-first bit stream of ``q - qmin`` (:func:`pack_bits`).
* Scales are float32 (weights may hold float16 ones, :func:`storable_scale`),
  zero-points int8.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)  # what the ops take (2/3 bits on CUDA: in PyTorch, see ops.py)


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# --------------------------------------------------------------------------
# packed layouts
# --------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [..., K] -> uint8 [..., ceil(K/2)]."""
    K = q.shape[-1]
    if K % 2:
        q = F.pad(q, (0, 1))
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [..., ceil(K/2)] -> int8 [..., K] with values in [-8, 7]."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :K]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def packed_len(n, bits: int):
    """Bytes one row of ``n`` ``bits``-bit values takes once packed
    (quant_math.h ``packed_row_bytes``; ``n`` may be a SymInt under tracing)."""
    if bits == 8:
        return n
    if bits == 4:
        return (n + 1) // 2
    return (n + 7) // 8 * bits


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ints in ``qrange(bits)``, shape [..., L] -> packed [..., packed_len(L, bits)].

    8 bits: int8 as is. 4 bits: :func:`pack_int4` (two's-complement nibbles).
    Other widths: uint8 bit stream of the offset-binary code ``q - qmin``, value
    ``i``'s bit ``j`` at stream bit ``i * bits + j``, LSB first; rows padded with
    zeros to a multiple of 8 values. (Weights use 2 and 3 bits, the KV cache 2-7.)
    """
    if bits == 8:
        return q.to(torch.int8).contiguous()
    if bits == 4:
        return pack_int4(q)
    qmin, _ = qrange(bits)
    L = q.shape[-1]
    u = q.to(torch.int32) - qmin
    if L % 8:
        u = F.pad(u, (0, 8 - L % 8))
    shifts = torch.arange(bits, device=q.device, dtype=torch.int32)
    stream = ((u.unsqueeze(-1) >> shifts) & 1).reshape(*u.shape[:-1], -1, 8)  # [..., bytes, 8]
    weights = torch.tensor([1 << i for i in range(8)], device=q.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, L: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: -> int8 [..., L]."""
    if bits == 8:
        return packed
    if bits == 4:
        return unpack_int4(packed, L)
    qmin, _ = qrange(bits)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1, bits)
    weights = torch.tensor([1 << j for j in range(bits)], device=packed.device, dtype=torch.int32)
    u = (stream * weights).sum(-1)[..., :L]
    return (u + qmin).to(torch.int8)


# --------------------------------------------------------------------------
# scale rules
# --------------------------------------------------------------------------
# Weight scales are held in float32 (default) or float16 (half the scale
# bytes: 0.25 bits per weight less at group size 64). A float16 scale is
# rounded *before* the integers are computed, so the stored (scale, q) pair is
# exactly what the quantizer chose.
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_MAX = 65504.0


def scale_dtype_of(name) -> torch.dtype:
    """torch dtype of a scale storage name ("float32" / "float16") or dtype."""
    if isinstance(name, torch.dtype) and name in SCALE_DTYPES.values():
        return name
    if name in SCALE_DTYPES:
        return SCALE_DTYPES[name]
    raise ValueError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {name!r}")


def storable_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale`` (float32) as a layer holding ``dtype`` scales will hold it.

    float16: scales below the smallest normal (2^-14: a group whose whole
    range is under ~1e-3 at 4 bits) are raised to it, which costs those tiny
    weights at most 2^-15 absolute error; scales above 65504 raise (checked
    only where the values exist: meta tensors have none)."""
    if dtype == torch.float32:
        return scale
    if dtype != torch.float16:
        raise ValueError(f"scale dtype must be float32 or float16, got {dtype}")
    if not scale.is_meta and (scale > _FP16_MAX).any():
        raise ValueError(f"a scale of {float(scale.max()):g} does not fit float16 (max {_FP16_MAX:g}); "
                         "use float32 scales for weights this large")
    return scale.clamp(min=_FP16_MIN_NORMAL).half().float()


def scale_from_absmax(absmax: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _, qmax = qrange(bits)
    scale = absmax.float() / qmax
    return storable_scale(torch.where(scale == 0, torch.ones_like(scale), scale), scale_dtype)


def scale_zp_from_minmax(mn: torch.Tensor, mx: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float32):
    qmin, qmax = qrange(bits)
    lo = torch.minimum(mn.float(), torch.zeros_like(mn, dtype=torch.float32))
    hi = torch.maximum(mx.float(), torch.zeros_like(mx, dtype=torch.float32))
    # NaN must survive minimum/maximum (torch.minimum propagates NaN).
    d = float((1 << bits) - 1)
    span = hi - lo
    # A finite range wider than float32's max (e.g. [-3e38, 3e38]) overflows
    # hi - lo; only then is the range divided first (hi/d - lo/d < 2/3 max:
    # finite). Everywhere else the rounding is (hi - lo) / d, as always.
    overflow = torch.isfinite(hi) & torch.isfinite(lo) & ~torch.isfinite(span)
    scale = torch.where(overflow, hi / d - lo / d, span / d)
    scale = storable_scale(torch.where(scale == 0, torch.ones_like(scale), scale), scale_dtype)
    zp = qmin - torch.round(lo / scale)
    zp = torch.nan_to_num(zp, nan=0.0).clamp(qmin, qmax).to(torch.int8)
    return scale, zp


# --------------------------------------------------------------------------
# granularity and rounding
# --------------------------------------------------------------------------
def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [..., K]`` viewed as ``[..., G, g]``: one scale per ``[..., G]`` entry."""
    if group_size == 0:
        return x.reshape(1, -1)
    if group_size == -1:
        return x.unsqueeze(-2)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def quantize_values(xg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """``xg [..., G, g]`` (float32) with ``scale`` / ``zp`` ``[..., G]`` -> int8 values
    ``clamp(round_half_even(x / scale) + zp, qmin, qmax)``, a NaN quotient giving 0."""
    qmin, qmax = qrange(bits)
    v = torch.round(xg / scale.unsqueeze(-1))
    v = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    v = v + zp.unsqueeze(-1).float()
    return v.clamp(qmin, qmax).to(torch.int8)


# --------------------------------------------------------------- act order
def perm_from_g_idx(g_idx: torch.Tensor, group_size: int) -> Optional[torch.Tensor]:
    """The input permutation that makes an act-order layer's groups contiguous.

    ``g_idx[k]`` names the group of input column ``k`` (GPTQ ``desc_act``).
    Returns ``None`` when ``g_idx == k // group_size`` (already contiguous),
    else ``perm`` (int64 ``[K]``, a stable sort) with ``g_idx[perm] ==
    arange(K) // group_size``: held column ``j`` is input column ``perm[j]``.
    Raises ``ValueError`` unless every group holds exactly ``group_size``
    columns (what GPTQ's act order produces)."""
    K = g_idx.numel()
    gi = g_idx.to(torch.int64).reshape(-1)
    contiguous = torch.arange(K) // group_size
    if torch.equal(gi, contiguous):
        return None
    if gi.numel() and (gi.min() < 0 or gi.max() >= -(-K // group_size)):
        raise ValueError(f"g_idx holds group indices outside [0, {-(-K // group_size)})")
    perm = torch.sort(gi, stable=True).indices
    if not torch.equal(gi[perm], contiguous):
        raise ValueError(f"g_idx does not give every group exactly {group_size} columns")
    return perm


def g_idx_from_perm(perm: Optional[torch.Tensor], K: int, group_size: int) -> torch.Tensor:
    """``g_idx`` (int32 ``[K]``) of a layer whose held column ``j`` is input
    column ``perm[j]`` (``None``: the identity)."""
    held = (torch.arange(K) // group_size).to(torch.int32)
    if perm is None:
        return held
    g = torch.empty(K, dtype=torch.int32)
    g[perm.cpu()] = held
    return g
