"""The CPU's pre-packed int8 weight layout ("panel64", cpu_kernels.h).

QLinear's W8A8 layers keep their weight ``[N, K]`` row-major (what save,
load, export and every other op read) and, on CPUs whose int8 kernel streams
panels (AVX-512 VNNI), derive once a second copy in the layout that kernel
consumes: ``ceil(N/64)`` panels of 64 output channels, each ``ceil(K/4)`` rows
of 64 x 4 bytes, so byte ``(n, k)`` sits at
``[n // 64, ((k // 4) * 64 + n % 64) * 4 + k % 4]`` and the padding is zero.
One activation dword broadcast then meets 64 columns in four ``vpdpbusd``:
no packing pass per call and no lane reductions per output. The copy is
derived, never saved (it costs one more byte per weight in memory).
"""

from __future__ import annotations

import torch

from . import quant_format

PANEL = 64  # output channels per panel (four zmm of int32 accumulators)


def packed_shape(N: int, K: int) -> tuple[int, int]:
    """Shape of the packed copy of an ``[N, K]`` weight."""
    return (-(-N // PANEL), -(-K // 4) * PANEL * 4)


def pack_int8_panels(w: torch.Tensor) -> torch.Tensor:
    """``w`` int8 ``[N, K]`` -> the panel layout (int8, :func:`packed_shape`)."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"pack_int8_panels: expected an int8 [N, K] weight, got {w.dtype} "
                         f"{list(w.shape)}")
    N, K = w.shape
    P, row = packed_shape(N, K)
    K4 = row // (PANEL * 4)
    padded = torch.zeros(P * PANEL, K4 * 4, dtype=torch.int8, device=w.device)
    padded[:N, :K] = w
    return padded.view(P, PANEL, K4, 4).permute(0, 2, 1, 3).reshape(P, row)


def unpack_int8_panels(wp: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of :func:`pack_int8_panels`: int8 ``[N, K]``."""
    P, row = packed_shape(N, K)
    if wp.dtype != torch.int8 or tuple(wp.shape) != (P, row):
        raise ValueError(f"unpack_int8_panels: expected int8 [{P}, {row}] for an [{N}, {K}] weight, got "
                         f"{wp.dtype} {list(wp.shape)}")
    K4 = row // (PANEL * 4)
    return wp.view(P, K4, PANEL, 4).permute(0, 2, 1, 3).reshape(P * PANEL, K4 * 4)[:N, :K].contiguous()


# ---------------------------------------------------------------- W4A8 ("w4panel16")
# QLinear's W4A8 layers (4-bit weights, dynamic int8 activations) derive, on
# the same CPUs, a copy in the layout of the AVX-512 VNNI W4A8 kernel
# (cpu_kernels.h gemm_w4a8_prepacked): 16 output channels per panel, K in
# blocks of 8 values held in 64 bytes; byte ``j`` of block ``b`` holds
# ``u(n, 8b + j % 4)`` in its low nibble and ``u(n, 8b + 4 + j % 4)`` in its
# high one, ``n = 16 p + j // 4``, ``u = q + 8`` (offset binary, padding 8).
# Beside it ``gparams`` float32 ``[P, G, 2, 16]``: each group's scales and
# ``8 + zero_point`` of the panel's 16 channels (padding: 1 and 8).
W4_PANEL = 16


def w4a8_packed_shapes(N: int, K: int, groups: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Shapes of ``(w_packed, gparams)`` for an ``[N, K]`` 4-bit weight in ``groups`` groups."""
    P = -(-N // W4_PANEL)
    return (P, -(-K // 8) * 64), (P, groups, 2, W4_PANEL)


def pack_w4a8(qw: torch.Tensor, scale: torch.Tensor, zero_point, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical 4-bit weight (``quant_format.pack_int4``, ``[N, ceil(K/2)]``) with
    its scales ``[N, G]`` (float32) and zero-points (int8 ``[N, G]`` or None) ->
    ``(w_packed uint8, gparams float32)`` in the layout above."""
    N, G = scale.shape
    if qw.dtype != torch.uint8 or qw.dim() != 2 or qw.shape[0] != N or qw.shape[1] != -(-K // 2):
        raise ValueError(f"pack_w4a8: expected a packed 4-bit weight uint8 [{N}, {-(-K // 2)}], got {qw.dtype} "
                         f"{list(qw.shape)}")
    (P, row), gshape = w4a8_packed_shapes(N, K, G)
    K8 = row // 64
    u = torch.full((P * W4_PANEL, K8 * 8), 8, dtype=torch.uint8, device=qw.device)
    u[:N, :K] = (quant_format.unpack_int4(qw, K).to(torch.int16) + 8).to(torch.uint8)
    v = u.view(P, W4_PANEL, K8, 2, 4).permute(0, 2, 1, 4, 3)  # [P, block, column, t, low/high]
    w_packed = (v[..., 0] | (v[..., 1] << 4)).reshape(P, row).contiguous()
    gp = torch.empty(P * W4_PANEL, G, 2, dtype=torch.float32, device=qw.device)
    gp[:, :, 0] = 1.0
    gp[:, :, 1] = 8.0
    gp[:N, :, 0] = scale.float()
    if zero_point is not None:
        gp[:N, :, 1] += zero_point.float()
    gparams = gp.view(P, W4_PANEL, G, 2).permute(0, 2, 3, 1).contiguous()
    assert tuple(gparams.shape) == gshape
    return w_packed, gparams


def unpack_w4a8(w_packed: torch.Tensor, gparams: torch.Tensor, N: int, K: int):
    """The inverse of :func:`pack_w4a8`: ``(q int8 [N, K], scale [N, G], zero_point int8 [N, G])``."""
    G = gparams.shape[1]
    (P, row), gshape = w4a8_packed_shapes(N, K, G)
    if w_packed.dtype != torch.uint8 or tuple(w_packed.shape) != (P, row) or tuple(gparams.shape) != gshape:
        raise ValueError(f"unpack_w4a8: expected uint8 [{P}, {row}] and float32 {list(gshape)}, got "
                         f"{w_packed.dtype} {list(w_packed.shape)} and {gparams.dtype} {list(gparams.shape)}")
    b = w_packed.view(P, row // 64, W4_PANEL, 4)
    v = torch.stack([b & 0x0F, b >> 4], dim=-1)  # [P, block, column, t, low/high]
    u = v.permute(0, 2, 1, 4, 3).reshape(P * W4_PANEL, row // 8)[:N, :K]
    q = (u.to(torch.int16) - 8).to(torch.int8)
    gp = gparams.permute(0, 3, 1, 2).reshape(P * W4_PANEL, G, 2)[:N]
    return q, gp[..., 0].contiguous(), (gp[..., 1] - 8).to(torch.int8)
