"""Per-layer candidates of a mixed-precision search: every quantizable linear
quantized once at every candidate bit width by the base quantizer, with the
exact bytes each version holds.

Layouts: 8-bit weights per output channel, symmetric (what the int8 kernels
take); 2/3/4-bit group-wise (``group_size``) asymmetric, packed
(:func:`llmeasyquant._reference.pack_bits`). Bytes = packed weights + scales
(float16 by default: the search optimises size; float32 on request) + int8
zero-points + bias: what :meth:`QLinear.memory_bytes` reports.

Base quantizers: ``rtn`` (round to nearest), ``gptq`` (Hessians of each
layer's input collected from the float model in one calibration pass, then
GPTQ per layer and bit width: the layers are quantized independently, which
is what lets a search combine them freely).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .._reference import packed_len, scale_dtype_of
from ..calibration import observe_model
from ..methods._common import weight_nk
from ..nn.qlinear import QLinear

BASES = ("rtn", "gptq")


@dataclass(frozen=True)
class Layout:
    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool
    scale_dtype: str = "float16"


def layout_for(bits: int, K: int, group_size: int, scale_dtype: str = "float16") -> Layout:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"candidate bits must be among 2, 3, 4, 8, got {bits}")
    scale_dtype_of(scale_dtype)  # a clear error for anything else
    if bits == 8:
        return Layout(8, -1, True, scale_dtype)
    if group_size > 0 and K % group_size:
        raise ValueError(f"group size {group_size} does not divide K={K}")
    return Layout(bits, group_size, False, scale_dtype)


def layer_bytes(N: int, K: int, layout: Layout, bias_bytes: int = 0) -> int:
    """Bytes a QLinear of this layout holds (weights, scales, zero-points, bias)."""
    G = 1 if layout.group_size == -1 else K // layout.group_size
    scale_bytes = scale_dtype_of(layout.scale_dtype).itemsize
    return N * packed_len(K, layout.bits) + N * G * scale_bytes + (0 if layout.symmetric else N * G) + bias_bytes


def _bias_bytes(module: nn.Module) -> int:
    b = getattr(module, "bias", None)
    return 0 if b is None else b.numel() * b.element_size()


@dataclass
class Candidate:
    layer: QLinear
    bytes: int


class Candidates:
    """``table[path][bits]`` -> Candidate, plus each layer's weight count."""

    def __init__(self, paths: list[str], bits: tuple[int, ...]):
        self.paths = paths
        self.bits = tuple(sorted(bits))
        self.table: dict[str, dict[int, Candidate]] = {p: {} for p in paths}
        self.numel: dict[str, int] = {}

    def bytes_of(self, assignment: dict[str, int]) -> int:
        return sum(self.table[p][b].bytes for p, b in assignment.items())

    def bits_per_weight(self, assignment: dict[str, int]) -> float:
        return 8.0 * self.bytes_of(assignment) / sum(self.numel[p] for p in assignment)

    def fp16_bytes(self) -> int:
        return 2 * sum(self.numel.values())


@torch.no_grad()
def collect_hessians(model: nn.Module, paths: list[str], batches, progress: bool = True) -> dict[str, torch.Tensor]:
    """X^T X (float64) of every layer's input over the calibration batches, float model."""
    H: dict[str, torch.Tensor] = {}
    for p in paths:
        K = weight_nk(model.get_submodule(p)).shape[1]
        H[p] = torch.zeros(K, K, dtype=torch.float64)

    def add(p: str, x: torch.Tensor) -> None:
        xd = x.reshape(-1, x.shape[-1]).double()
        H[p].add_(xd.T @ xd)

    observe_model(model, paths, batches, add, "search: Hessians", progress)
    return H


def quantize_layer(module: nn.Module, layout: Layout, base: str, hessian=None) -> QLinear:
    if base == "rtn" or layout.bits == 8:  # 8-bit: RTN is already near-lossless
        return QLinear.from_linear(module, w_bits=layout.bits, w_group_size=layout.group_size,
                                   w_symmetric=layout.symmetric, act=None, w_scale_dtype=layout.scale_dtype)
    from ..methods.base import GPTQConfig
    from ..methods.gptq import gptq_quantize
    from ..methods.gptq_method import quantized_from

    # act_order: as GPTQConfig's default (it cut W4 g64's perplexity increase by a third on SmolLM2)
    r = gptq_quantize(weight_nk(module).float(), hessian, bits=layout.bits, group_size=layout.group_size,
                      symmetric=layout.symmetric, act_order=True, scale_dtype=scale_dtype_of(layout.scale_dtype))
    cfg = GPTQConfig(w_bits=layout.bits, w_group_size=layout.group_size, w_symmetric=layout.symmetric, act=None,
                     w_scale_dtype=layout.scale_dtype)
    return quantized_from(module, cfg, r.q, r.scale, r.zero_point)


@torch.no_grad()
def build_candidates(model: nn.Module, paths: list[str], bits: tuple[int, ...], group_size: int, base: str,
                     batches=None, progress: bool = True, scale_dtype: str = "float16") -> Candidates:
    if base not in BASES:
        raise ValueError(f"unknown base quantizer {base!r}; choose from {', '.join(BASES)}")
    if base == "gptq" and not batches:
        raise ValueError("base quantizer 'gptq' needs calibration batches")
    hessians = collect_hessians(model, paths, batches, progress) if base == "gptq" else {}
    c = Candidates(paths, bits)
    for p in tqdm(paths, desc=f"search: {base} candidates", disable=not progress):
        mod = model.get_submodule(p)
        N, K = weight_nk(mod).shape
        c.numel[p] = N * K
        for b in c.bits:
            lay = layout_for(b, K, group_size, scale_dtype)
            ql = quantize_layer(mod, lay, base, hessians.get(p))
            c.table[p][b] = Candidate(ql, layer_bytes(N, K, lay, _bias_bytes(mod)))
        hessians.pop(p, None)  # free as we go
    return c
