"""Mixed precision from a bit map (what :mod:`llmeasyquant.search` found, or
one written by hand): each listed layer is quantized at its own bit width by
the base quantizer, exactly as the search's candidates are built (this module
owns the layouts and the per-layer quantizer both use; GPTQ uses each layer's
Hessian from the float model), so ``quantize(model, "mixed",
bitmap=result.assignment, base=result.base)`` reproduces a searched model.

Layouts: 8-bit weights per output channel, symmetric (what the int8 kernels
take); 2/3/4-bit group-wise asymmetric, packed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from ..quant_format import scale_dtype_of
from ..models.extract import ModelSpec
from ..nn.qlinear import QLinear
from ..pipeline import observe_linears
from ._common import quantized_from, swap, target_paths, weight_nk
from .base import QuantConfig, register_method
from .gptq import GPTQConfig, gptq_quantize

BASES = ("rtn", "gptq")


@dataclass
class MixedConfig(QuantConfig):
    """Per-layer bit widths (``bitmap``: layer path -> 2, 3, 4 or 8), e.g. from
    :func:`llmeasyquant.search.search`. 8-bit layers per channel symmetric,
    lower widths group-wise (``w_group_size``) asymmetric; ``base``: ``rtn`` or
    ``gptq`` (each layer with its own input Hessian from the float model).
    Layers not in the map stay float."""

    method: ClassVar[str] = "mixed"
    bitmap: dict = field(default_factory=dict)
    base: str = "rtn"
    w_group_size: int = 64
    w_symmetric: bool = False
    n_calib: int = 16  # as llmeasyquant.search draws the candidates' calibration windows
    w_scale_dtype: str = "float16"  # as the search's candidates (size is what it optimises)

    def describe(self) -> str:
        counts: dict = {}
        for b in self.bitmap.values():
            counts[b] = counts.get(b, 0) + 1
        mix = ", ".join(f"{n}xW{b}" for b, n in sorted(counts.items()))
        return f"mixed ({mix}) {self.base} g{self.w_group_size} {self.w_scale_dtype} scales"


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


@torch.no_grad()
def collect_hessians(model: nn.Module, spec: ModelSpec, paths: Sequence[str], batches,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """X^T X (float64) of every layer's input over the calibration batches, float
    model: decoder-block linears block by block in one pass (one block's
    activations held at a time), any others from one whole-model pass."""
    H: dict[str, torch.Tensor] = {}
    for p in paths:
        K = weight_nk(model.get_submodule(p)).shape[1]
        H[p] = torch.zeros(K, K, dtype=torch.float64)

    def add(p: str, x: torch.Tensor) -> None:
        xd = x.reshape(-1, x.shape[-1]).double()
        H[p].add_(xd.T @ xd)

    observe_linears(model, spec, paths, batches, add, desc="Hessians", progress=progress)
    return H


def quantize_layer(module: nn.Module, layout: Layout, base: str, hessian: Optional[torch.Tensor] = None) -> QLinear:
    """One layer at ``layout`` by ``base`` (rtn, or gptq with the layer's Hessian)."""
    # 8-bit: RTN is already near-lossless. An all-zero Hessian (an expert no
    # calibration token was routed to) says nothing: GPTQ would zero its columns
    if base == "rtn" or layout.bits == 8 or (hessian is not None and not hessian.diagonal().any()):
        return QLinear.from_linear(module, w_bits=layout.bits, w_group_size=layout.group_size,
                                   w_symmetric=layout.symmetric, act=None, w_scale_dtype=layout.scale_dtype)
    # act_order: as GPTQConfig's default (it cut W4 g64's perplexity increase by a third on SmolLM2)
    r = gptq_quantize(weight_nk(module).float(), hessian, bits=layout.bits, group_size=layout.group_size,
                      symmetric=layout.symmetric, act_order=True, scale_dtype=scale_dtype_of(layout.scale_dtype))
    cfg = GPTQConfig(w_bits=layout.bits, w_group_size=layout.group_size, w_symmetric=layout.symmetric, act=None,
                     w_scale_dtype=layout.scale_dtype)
    return quantized_from(module, cfg, r.q, r.scale, r.zero_point)


@register_method(MixedConfig, calibrates=lambda config: config.base == "gptq")
@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config: MixedConfig, calib, *, progress: bool = True, shard=None,
          device=None) -> None:
    if config.base not in BASES:
        raise ValueError(f"mixed: unknown base {config.base!r}; choose from {', '.join(BASES)}")
    if config.act is not None:
        raise ValueError("mixed: weight-only (act=None); activation quantization is not part of the bit map")
    if not config.bitmap:
        raise ValueError("mixed: the bit map is empty (layer path -> bits)")
    known = set(target_paths(model, spec, ()))
    unknown = sorted(set(config.bitmap) - known)
    if unknown:
        raise ValueError(f"mixed: the bit map names layers this model does not have: {unknown[:5]}")
    paths = [p for p in target_paths(model, spec, ()) if p in config.bitmap]
    H = collect_hessians(model, spec, paths, calib, progress) if config.base == "gptq" else {}
    for p in paths:
        mod = model.get_submodule(p)
        lay = layout_for(int(config.bitmap[p]), weight_nk(mod).shape[1], config.w_group_size, config.w_scale_dtype)
        swap(model, p, quantize_layer(mod, lay, config.base, H.pop(p, None)))
