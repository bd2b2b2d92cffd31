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

from ..quant_format import packed_len, scale_dtype_of
from ..methods._common import weight_nk
from ..methods.mixed import BASES, Layout, collect_hessians, layout_for, quantize_layer  # noqa: F401
from ..models.extract import ModelSpec
from ..nn.qlinear import QLinear

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
def build_candidates(model: nn.Module, spec: ModelSpec, paths: list[str], bits: tuple[int, ...], group_size: int,
                     base: str, batches=None, progress: bool = True, scale_dtype: str = "float16") -> Candidates:
    if base not in BASES:
        raise ValueError(f"unknown base quantizer {base!r}; choose from {', '.join(BASES)}")
    if base == "gptq" and not batches:
        raise ValueError("base quantizer 'gptq' needs calibration batches")
    hessians = collect_hessians(model, spec, paths, batches, progress) if base == "gptq" else {}
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
