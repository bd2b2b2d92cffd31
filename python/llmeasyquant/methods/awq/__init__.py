"""AWQ on a whole model, block by block (:mod:`llmeasyquant.pipeline`): for
each scale group (linears that share an input), search the activation-aware
per-channel scale, fold it into the preceding norm/linear (exact in float),
then search per-group weight clipping for each linear and round to nearest.
The per-layer searches are in :mod:`.search`.

The scale search measures the error of the group's own linear outputs (the
AWQ reference measures the whole attention/MLP sub-block output); this keeps
the method architecture-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ...calibration import ChannelStats
from ...models.extract import ModelSpec
from ...pipeline import BlockContext, BlockHooks
from ...sharding import Shard
from .._common import fold_scales, quantize_blockwise, swap, to_qlinear, weight_nk
from ..base import QuantConfig, register_method
from .search import (AWQScaleResult, apply_clip, apply_scale_to_linear_weight, awq_search_clip,  # noqa: F401
                     awq_search_scale, fake_quantize_rtn)

_KEEP_TOKENS = 4096  # calibration rows kept per linear input for the searches


@dataclass
class AWQConfig(QuantConfig):
    method: ClassVar[str] = "awq"
    w_bits: int = 4
    w_group_size: int = 64
    w_symmetric: bool = False
    grid: int = 20
    clip: bool = True
    n_calib: int = 32


class _AWQHooks(BlockHooks):
    desc = "AWQ"

    def __init__(self, config: AWQConfig, spec: ModelSpec):
        self.config, self.spec = config, spec

    def observe(self, ctx: BlockContext):
        # data-parallel: every rank keeps its share, so the union is ~_KEEP_TOKENS rows
        per_batch = max(1, _KEEP_TOKENS // max(1, ctx.batches))
        self.xs = {n: ChannelStats.empty(weight_nk(ctx.module(n)).shape[1], keep_tokens=_KEEP_TOKENS)
                   for n in ctx.names}

        def keep(n: str, x: torch.Tensor) -> None:
            idx = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0])).round().long()
            self.xs[n].update(x[idx].float())

        return {n: (lambda x, n=n: keep(n, x)) for n in ctx.names}

    def quantize(self, ctx: BlockContext) -> None:
        cfg, xs, shard = self.config, self.xs, ctx.shard
        shard.reduce_stats_({ctx.path(n): xs[n] for n in ctx.names})
        # an expert no calibration token was routed to: no scale search, no
        # clip search, round-to-nearest (the driver reports it)
        groups = [g for g in self.spec.groups_of(ctx.index) if all(n in xs for n in g.linears)
                  and xs[g.linears[0]].seen]
        gkeys = [f"{g.linears[0]}/scale" for g in groups]
        mine = ctx.assign(gkeys, [sum(weight_nk(ctx.module(n)).numel() for n in g.linears) for g in groups])
        for g, gk in zip(groups, gkeys):
            scale = None
            if gk in mine:
                with shard.phase(ctx.path(g.linears[0]), "quant"):
                    weights = [weight_nk(ctx.module(n)).float() for n in g.linears]
                    scale = awq_search_scale(weights, xs[g.linears[0]].samples, bits=cfg.w_bits,
                                             group_size=cfg.w_group_size, symmetric=cfg.w_symmetric,
                                             grid=cfg.grid).scale
            scale = shard.share(ctx.path(gk), scale)
            fold_scales(ctx.block, g, scale)
            for n in g.linears:
                xs[n].divide_(scale)
        owned = ctx.assign(ctx.names, [weight_nk(ctx.module(n)).numel() for n in ctx.names])
        for n in ctx.names:
            if n not in owned:
                continue
            mod = ctx.module(n)
            with shard.phase(ctx.path(n), "quant"):
                if cfg.clip and xs[n].seen:
                    W = weight_nk(mod).float()
                    clip = awq_search_clip(W, xs[n].samples, bits=cfg.w_bits, group_size=cfg.w_group_size,
                                           symmetric=cfg.w_symmetric)
                    clipped = apply_clip(W, clip)
                    if isinstance(mod, nn.Linear):
                        mod.weight.copy_(clipped)
                    else:  # Conv1D stores [in, out]
                        mod.weight.copy_(clipped.t())
                swap(ctx.block, n, to_qlinear(mod, cfg))
        self.xs = {}


@register_method(AWQConfig, calibrates=True)
@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config: AWQConfig, calib, *, progress: bool = True,
          shard: Optional[Shard] = None, device=None):
    return quantize_blockwise(model, spec, config, calib, _AWQHooks(config, spec), progress=progress,
                              shard=shard, device=device)
