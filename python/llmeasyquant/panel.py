"""4-bit weights in the layout the CUDA W4A16 tensor-core kernel streams
(``src/cuda/gemm_w4_panel.cu``): a cache derived once per layer from the
canonical packed weight, never saved.

The canonical int4 weight (``quant_format.pack_int4``: ``[N, ceil(K/2)]``,
two values per byte along K) is what state_dict, save/load, ONNX and the CPU
kernels see. On a GPU the W4A16 GEMM wants each lane's B fragments in one
16-byte load: :func:`pack` re-lays the values out into panels of 64 output
channels, ``qpanel`` int32 ``[N64, K16, 32, 4]`` (panel, k16 tile, lane,
word), the slot of every value given by ``mma_layout.h``
(``w4_panel_slot`` / ``w4_panel_elem``; tests/test_panel.py checks this
module against those functions). Nibbles hold ``q + 8``. The group parameters
go with it as float32 ``[N64, G, 2, 8, 8]``: per panel and group the 64 scales
and the 64 values ``8 + zero_point``, in the order a lane reads its eight
columns (``w4_panel_param``).

What the kernel computes (:func:`dequantize`, and ``linear`` below, which is
the op's PyTorch kernel): the weight in the activations' 16-bit dtype ``dt``,
``W = dt((q - z) * dt(s))`` (``q - z`` exact, one rounding of the product by a
scale rounded to ``dt``: what AWQ/Marlin-style kernels compute), then
``x @ W^T`` accumulated in float32, ``bias`` added in float32, one rounding to
``dt``. This is one rounding of the weight more than ``weight_only_linear``
(which scales in float32); the difference is within bf16's own rounding of the
weight (|error| <= 2^-8 relative per weight in bf16, 2^-11 in fp16).

Valid for the kernel's exact unpacking (``(128 + (q + 8)) - (128 + 8 + z)``
in bf16 is exact for z <= 120; fp16's 1024 offset for every int8 z): :func:`pack`
returns None when a zero-point is outside that range, and the caller keeps the
canonical kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .quant_format import unpack_int4

# QLinear takes the panel kernel on CUDA for MIN_M <= M <= MAX_M: at M <= 8
# the canonical GEMV (gemm_wo.cu) streams the weights once and wins; above
# MAX_M dequantize + cuBLAS. MAX_M is a guess until a GPU measures the
# crossover (bench_gemm_cuda.py prints both); LLMEQ_CUDA_WO=panel forces the
# panel kernel at every M, any other forced path keeps the canonical op.
MIN_M = 9
MAX_M = 256
PANEL_N = 64  # output channels per panel
TILE_K = 16  # K values per tile (one mma k16 step)
STAGE_K = 64  # K values per pipeline stage: the panel is padded to a multiple
BF16_MAX_ZERO = 120  # 128 + 8 + z must be exact in bf16 (<= 256)


def _tile_index():
    """For lane l, word w, nibble i of a k16 x n64 tile: the (k, n) it holds
    (``mma_layout.h`` ``w4_panel_elem``), as two index tensors [32, 4, 8]."""
    lane = torch.arange(32).view(32, 1, 1)
    word = torch.arange(4).view(1, 4, 1)
    nib = torch.arange(8).view(1, 1, 8)
    e = ((nib & 1) << 1) | (nib >> 2)  # element of the h_b fragment
    j = 2 * word + ((nib >> 1) & 1)  # n8 tile
    group, tig = lane >> 2, lane & 3
    k = tig * 2 + (e & 1) + torch.where(e >= 2, 8, 0)
    n = 8 * j + group
    return k.expand(32, 4, 8), n.expand(32, 4, 8)


_K_IDX, _N_IDX = _tile_index()


def wanted(x: torch.Tensor, bits: int) -> bool:
    """Whether a 4-bit weight-only layer should run ``x`` on the panel kernel."""
    if not x.is_cuda or bits != 4 or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() == 0:
        return False
    setting = os.environ.get("LLMEQ_CUDA_WO") or "auto"
    if setting == "panel":
        return True
    M = x.numel() // max(1, x.shape[-1])
    return setting == "auto" and MIN_M <= M <= MAX_M


@dataclass(frozen=True)
class Panel:
    """The derived CUDA layout of one 4-bit layer (see the module docstring)."""

    qpanel: torch.Tensor  # int32 [N64, K16, 32, 4]
    gparams: torch.Tensor  # float32 [N64, G, 2, 8, 8]


def supported(in_features: int, group_size: int) -> bool:
    """The shapes the panel kernel takes: K a multiple of 16 and groups that
    never split a 64-value pipeline stage (g % 64 == 0), or one group per row."""
    K = in_features
    if K <= 0 or K % TILE_K:
        return False
    g = K if group_size in (-1, K) else group_size
    return g == K or (g > 0 and g % STAGE_K == 0 and K % g == 0)


def pack(qweight: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], group_size: int,
         in_features: int) -> Optional[Panel]:
    """Canonical 4-bit weight + scales -> :class:`Panel` on the same device, or
    None when the kernel cannot take it (:func:`supported`, zero-points outside
    the exact range). Pure PyTorch; runs once per layer."""
    N, K = qweight.shape[0], in_features
    if qweight.dtype != torch.uint8 or not supported(K, group_size):
        return None
    g = K if group_size in (-1, K) else group_size
    G = K // g
    s = scale.reshape(N, -1).float()
    z = (torch.zeros(N, G, dtype=torch.int8, device=qweight.device) if zero_point is None
         else zero_point.reshape(N, -1))
    if s.shape[1] != G or z.shape[1] != G:
        return None
    if N and int(z.max()) > BF16_MAX_ZERO:  # one host sync, once per layer
        return None
    P, KT = -(-N // PANEL_N), -(-K // STAGE_K) * (STAGE_K // TILE_K)
    u = unpack_int4(qweight, K).to(torch.int32) + 8
    u = F.pad(u, (0, KT * TILE_K - K, 0, P * PANEL_N - N), value=8)
    tiles = u.view(P, PANEL_N, KT, TILE_K).permute(0, 2, 3, 1)  # [P, KT, k16, n64]
    nibs = tiles[:, :, _K_IDX.to(u.device), _N_IDX.to(u.device)].to(torch.int64)  # [P, KT, 32, 4, 8]
    shifts = 4 * torch.arange(8, device=u.device, dtype=torch.int64)
    words = (nibs << shifts).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    sp = F.pad(s, (0, 0, 0, P * PANEL_N - N), value=0.0)
    zp = F.pad(z.float() + 8, (0, 0, 0, P * PANEL_N - N), value=8.0)
    # column n = 8 j + (n & 7) of a panel -> [.., (n & 7), j]
    order = lambda t: t.view(P, 8, 8, G).permute(0, 3, 2, 1)  # noqa: E731  [P, G, n&7, j]
    gparams = torch.stack([order(sp), order(zp)], dim=2).contiguous()
    return Panel(words.contiguous(), gparams)


def unpack(qpanel: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """:func:`pack`'s inverse for the values: int8 ``q`` [N, K] (signed)."""
    P, KT = qpanel.shape[0], qpanel.shape[1]
    shifts = 4 * torch.arange(8, device=qpanel.device, dtype=torch.int64)
    nibs = (qpanel.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [P, KT, 32, 4, 8]
    tiles = torch.empty(P, KT, TILE_K, PANEL_N, dtype=torch.int64, device=qpanel.device)
    tiles[:, :, _K_IDX.to(qpanel.device), _N_IDX.to(qpanel.device)] = nibs
    u = tiles.permute(0, 3, 1, 2).reshape(P * PANEL_N, KT * TILE_K)
    return (u[:out_features, :in_features] - 8).to(torch.int8)


def group_params(gparams: torch.Tensor, out_features: int):
    """-> (scale [N, G] float32, 8 + zero_point [N, G] float32)."""
    P, G = gparams.shape[0], gparams.shape[1]
    t = gparams.permute(2, 0, 4, 3, 1)  # [2, P, j, n&7, G]
    t = t.reshape(2, P * PANEL_N, G)[:, :out_features]
    return t[0], t[1]


def dequantize(qpanel: torch.Tensor, gparams: torch.Tensor, out_features: int, in_features: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight as the kernel forms it: ``dtype((q - z) * dtype(s))`` [N, K]."""
    q = unpack(qpanel, out_features, in_features).to(torch.float32)
    s, zz = group_params(gparams, out_features)
    g = in_features // s.shape[1]
    qz = q - (zz - 8).repeat_interleave(g, dim=1)  # exact: small integers
    return qz.to(dtype) * s.to(dtype).repeat_interleave(g, dim=1)


def linear(x: torch.Tensor, qpanel: torch.Tensor, gparams: torch.Tensor, out_features: int,
           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The panel op in PyTorch (float32 accumulation, see the module docstring)."""
    K = x.shape[-1]
    w = dequantize(qpanel, gparams, out_features, K, x.dtype)
    out = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    return out.to(x.dtype)
