"""SmoothQuant (Xiao et al. 2023): per-input-channel smoothing scales

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

divide the activations (folded into the preceding norm or linear, so the
float model is unchanged) and multiply the weights, moving activation
outliers into the weights where per-channel weight scales absorb them.
Then W8A8 (per-token dynamic or static per-tensor activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from .. import ops
from ..calibration import ChannelStats, collect_input_stats
from ..models.extract import ModelSpec
from ..pipeline import BlockContext, BlockHooks, run_blocks
from ..sharding import Shard
from ._common import fold_scales, quantize_owned, target_paths, weight_nk
from .base import QuantConfig, register_method

_MIN_SCALE = 1e-5


@dataclass
class SmoothQuantConfig(QuantConfig):
    """Migrate activation outliers into the weights with per-channel scales
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the previous op."""

    method: ClassVar[str] = "smoothquant"
    act: Optional[str] = "dynamic"
    # asymmetric per-token activations cost nothing extra in the int8 GEMM
    # (its epilogue always applies a zero-point correction) and halved the
    # W8A8 perplexity increase on SmolLM2-135M (docs/results.md)
    act_symmetric: bool = False
    alpha: float = 0.5
    # alpha searched per scale group on calibration tokens (output error of the
    # quantized group); empty: use `alpha` everywhere
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j for input channel j; weights are [out, in] and share the input."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().clamp(min=_MIN_SCALE)
    w = w_absmax.clamp(min=_MIN_SCALE)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_MIN_SCALE)


def _w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, act: str, act_symmetric: bool) -> float:
    """Output error of W8A8 with smoothing s on sample tokens x, activations
    quantized as the layer will (per token, or one per-tensor range)."""
    xs = x / s
    gran = 0 if act == "static" else -1
    q, sc, z = ops.quantize(xs, 8, act_symmetric, gran)
    xq = ops.dequantize(q, sc, z, 8, gran, xs.shape[-1])
    err = 0.0
    for w in weights:
        ws = w.float() * s
        qw, sw, zw = ops.quantize(ws, 8, True, -1)
        wq = ops.dequantize(qw, sw, zw, 8, -1, ws.shape[-1])
        err += (xq @ wq.T - x @ w.float().T).pow(2).sum().item()
    return err


class _SmoothHooks(BlockHooks):
    """Statistics of the float model, block by block; each block's scale
    groups smoothed (alpha searched, scales folded) once its statistics are
    in. Folding leaves the block's function unchanged, so the statistics
    pass is also the forward (``sequential = False``): calibration costs one
    forward over the samples."""

    desc = "SmoothQuant"
    sequential = False

    def __init__(self, config: SmoothQuantConfig, spec: ModelSpec, targets: set[str]):
        self.config, self.spec, self.targets = config, spec, targets
        self.stats: dict[str, ChannelStats] = {}  # full path -> statistics (static ranges use them at the end)

    def observe(self, ctx: BlockContext):
        # the first linear of each group gives the group's input; static
        # activations need every quantized linear's range
        names = {g.linears[0] for g in self.spec.groups_of(ctx.index)} | {n for n in self.spec.linears_of(ctx.index)
                                                                          if ctx.path(n) in self.targets}
        keep = 256 if self.config.alpha_grid else 0
        block_stats = {n: ChannelStats.empty(weight_nk(ctx.module(n)).shape[1], device=ctx.module(n).weight.device,
                                             keep_tokens=keep) for n in sorted(names)}
        self.block_stats = block_stats
        return {n: (lambda x, st=st: st.update(x.float())) for n, st in block_stats.items()}

    def quantize(self, ctx: BlockContext) -> None:
        cfg, shard = self.config, ctx.shard
        stats = {ctx.path(n): st for n, st in self.block_stats.items()}
        shard.reduce_stats_(stats)
        # an expert no calibration token was routed to has no statistics: no smoothing
        groups = [g for g in self.spec.groups_of(ctx.index) if stats[ctx.path(g.linears[0])].seen]
        # the alpha searches are the costly part: spread the scale groups over the ranks
        keys = [g.linears[0] for g in groups]
        mine = ctx.assign(keys, [sum(weight_nk(ctx.module(n)).numel() for n in g.linears) for g in groups]) \
            if cfg.alpha_grid else set(keys)
        for g in groups:
            key = ctx.path(g.linears[0])
            weights = [weight_nk(ctx.module(n)) for n in g.linears]
            alpha = cfg.alpha
            if cfg.alpha_grid:
                if g.linears[0] in mine:
                    x = stats[key].samples
                    with shard.phase(key, "quant"):
                        alpha = min(cfg.alpha_grid, key=lambda a: _w8a8_error(
                            x, weights, smoothing_scales(stats[key].absmax, weights, a), cfg.act, cfg.act_symmetric))
                alpha = shard.share(key, alpha)
            # every rank folds the same scales (same statistics, same alpha)
            s = smoothing_scales(stats[key].absmax, weights, alpha)
            fold_scales(ctx.block, g, s)
            # the layers now see X / s: keep their statistics consistent
            for n in g.linears:
                st = stats.get(ctx.path(n))
                if st is not None:
                    st.divide_(s)
        self.stats.update({p: st for p, st in stats.items() if p in self.targets})


@register_method(SmoothQuantConfig, calibrates=True)
@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config: SmoothQuantConfig, calib, *, progress: bool = True,
          shard: Optional[Shard] = None, device=None):
    shard = shard or Shard()
    paths = target_paths(model, spec, config.exclude)
    hooks = _SmoothHooks(config, spec, set(paths))
    # the blocks are smoothed in the pass, the linears quantized after it
    # (their static ranges need the smoothed statistics): no targets inside
    report = run_blocks(model, spec, calib, hooks, targets=set(), shard=shard, progress=progress, device=device)
    stats = hooks.stats
    outside = [p for p in paths if p not in stats]
    if config.act == "static" and outside:
        # linears outside the decoder blocks (none by default: lm_head stays float)
        with shard.phase("calibration", "calib"):
            extra = collect_input_stats(model, outside, calib, progress)
        shard.reduce_stats_(extra)
        stats.update(extra)
    quantize_owned(model, paths, config, shard, stats)
    return report
