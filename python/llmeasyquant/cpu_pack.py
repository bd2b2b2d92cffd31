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
