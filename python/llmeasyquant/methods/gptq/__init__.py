"""GPTQ on a whole model: block by block (:mod:`llmeasyquant.pipeline`), each
block's linears quantized with the Hessian of the inputs they receive from the
already-quantized blocks before them. The per-layer algorithm is
:func:`.solver.gptq_quantize`.

All linears of a block are quantized from one pass over the block (not
"true-sequential" within the block): simpler, and for the attention/MLP
sub-groups the difference is small in the GPTQ paper's ablation. Linears that
read the same input (q/k/v, gate/up) share one Hessian and one solve of their
stacked rows (:func:`shared_input_units`): the result of one solve each (up to
float rounding), computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ...quant_format import scale_dtype_of
from ...models.extract import ModelSpec
from ...pipeline import BlockContext, BlockHooks
from ...sharding import Shard
from .._common import quantize_blockwise, quantized_from, swap, to_qlinear, weight_nk
from ..base import QuantConfig, register_method
from .solver import ClipSearch, GPTQResult, gptq_quantize

__all__ = ["ClipSearch", "GPTQConfig", "GPTQResult", "apply", "gptq_quantize"]


@dataclass
class GPTQConfig(QuantConfig):
    method: ClassVar[str] = "gptq"
    w_bits: int = 4
    w_group_size: int = 64
    w_symmetric: bool = False
    block_size: int = 128
    damp: float = 0.01
    # columns in order of decreasing Hessian diagonal (static groups: no run-time
    # cost); on SmolLM2-135M W4 g64 it cut GPTQ's perplexity increase from +26 %
    # to +17 % (RTN: +34 %), 4 windows x 1024 tokens
    act_order: bool = True
    n_calib: int = 32
    # MSE-optimal per-group range: shrink factors 1, 0.99, ..., 0.2 of min/max, the one with the least
    # sum |w - dq|^2.4 per group (the GPTQ reference's Quantizer(mse=True)); off: min/max ranges
    clip_search: bool = False


def _add_gram(H: torch.Tensor, x: torch.Tensor) -> None:
    xd = x.double()
    H.add_(xd.T @ xd)


def shared_input_units(spec: ModelSpec, ctx: BlockContext) -> list[tuple[str, ...]]:
    """The block's target linears grouped by the input they read (a scale
    group's linears read the same tensor: q/k/v, gate/up), every other linear
    alone, in block order. GPTQ's rows are independent given the Hessian, so a
    unit needs one Hessian and one solve of its linears' stacked rows."""
    wanted = set(ctx.names)
    units, seen = [], set()
    for g in spec.groups_of(ctx.index):
        unit = tuple(n for n in g.linears if n in wanted and n not in seen)
        if len(unit) > 1:
            units.append(unit)
            seen.update(unit)
    units += [(n,) for n in ctx.names if n not in seen]
    order = {n: i for i, n in enumerate(ctx.names)}
    return sorted(units, key=lambda u: order[u[0]])


class _GPTQHooks(BlockHooks):
    desc = "GPTQ"

    def __init__(self, config: GPTQConfig, spec: ModelSpec):
        self.config, self.spec = config, spec

    def observe(self, ctx: BlockContext):
        self.units = {u[0]: u for u in shared_input_units(self.spec, ctx)}  # first linear -> unit
        rows = {k: sum(weight_nk(ctx.module(n)).shape[0] for n in u) for k, u in self.units.items()}
        K = {k: weight_nk(ctx.module(k)).shape[1] for k in self.units}
        # Cholesky O(K^3) + column sweep O(N K^2); a unit goes to one rank whole
        self.mine = ctx.assign_units(list(self.units.values()), [K[k] ** 2 * (rows[k] + K[k]) for k in self.units])
        # data-parallel: every rank adds its batches' part of every Hessian;
        # replicated calibration: only the owner needs a unit's Hessian. The
        # unit's first linear is observed: the others read the same input.
        observed = list(self.units) if ctx.shard.data_parallel else [k for k in self.units if k in self.mine]
        self.hessians = {k: torch.zeros(K[k], K[k], dtype=torch.float64, device=ctx.module(k).weight.device)
                         for k in observed}
        return {k: (lambda x, H=self.hessians[k]: _add_gram(H, x)) for k in observed}

    def quantize(self, ctx: BlockContext) -> None:
        cfg = self.config
        for k in self.hessians:
            ctx.shard.reduce_to_owner_(ctx.path(k), self.hessians[k])
        for k, unit in self.units.items():
            if k not in self.mine:
                continue
            mods = [ctx.module(n) for n in unit]
            H = self.hessians.pop(k)
            if not H.diagonal().any():
                # no calibration token (an expert nothing was routed to): an
                # all-zero Hessian says nothing about the weights, so
                # round-to-nearest with the same format (the driver reports it)
                with ctx.shard.phase(ctx.path(k), "quant"):
                    for n, mod in zip(unit, mods):
                        swap(ctx.block, n, to_qlinear(mod, cfg))
                continue
            sizes = [weight_nk(mod).shape[0] for mod in mods]
            with ctx.shard.phase(ctx.path(k), "load"):
                W = torch.cat([weight_nk(mod).float() for mod in mods])
            with ctx.shard.phase(ctx.path(k), "quant"):
                r = gptq_quantize(W, H, bits=cfg.w_bits, group_size=cfg.w_group_size,
                                  symmetric=cfg.w_symmetric, block_size=cfg.block_size, damp=cfg.damp,
                                  act_order=cfg.act_order, scale_dtype=scale_dtype_of(cfg.w_scale_dtype),
                                  clip=ClipSearch() if cfg.clip_search else None)
                for n, mod, q, scale, zero in zip(unit, mods, r.q.split(sizes), r.scale.split(sizes),
                                                  r.zero_point.split(sizes)):
                    swap(ctx.block, n, quantized_from(mod, cfg, q, scale, zero))
        self.hessians.clear()


@register_method(GPTQConfig, calibrates=True)
@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config: GPTQConfig, calib, *, progress: bool = True,
          shard: Optional[Shard] = None, device=None):
    return quantize_blockwise(model, spec, config, calib, _GPTQHooks(config, spec), progress=progress, shard=shard,
                              device=device)
