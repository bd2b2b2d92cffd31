"""SmoothQuant (Xiao et al. 2023): per-input-channel smoothing scales

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

divide the activations (folded into the preceding norm or linear, so the
float model is unchanged) and multiply the weights, moving activation
outliers into the weights where per-channel weight scales absorb them.
Then W8A8 (per-token dynamic or static per-tensor activations).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..calibration import collect_input_stats
from ..sharding import Shard
from ..models.extract import ModelSpec
from ._common import fold_scales, quantize_owned, target_paths, weight_nk

_MIN_SCALE = 1e-5


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


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True,
          shard: Optional[Shard] = None) -> None:
    shard = shard or Shard()
    prefix = spec.arch.layers_path
    first = [f"{prefix}.{i}.{g.linears[0]}" for i in range(len(spec.blocks)) for g in spec.groups]
    paths = target_paths(model, spec, config.exclude)
    keep = 256 if config.alpha_grid else 0
    with shard.phase("calibration", "calib"):
        stats = collect_input_stats(model, sorted(set(first) | set(paths)), calib, progress, keep_tokens=keep)
    shard.reduce_stats_(stats)
    # the alpha searches are the costly part: spread the scale groups over the ranks
    keys = [f"{prefix}.{i}.{g.linears[0]}" for i in range(len(spec.blocks)) for g in spec.groups]
    costs = [sum(weight_nk(spec.blocks[i].get_submodule(n)).numel() for n in g.linears)
             for i in range(len(spec.blocks)) for g in spec.groups]
    mine = shard.assign(keys, costs) if config.alpha_grid else set(keys)
    for i, block in enumerate(spec.blocks):
        for g in spec.groups:
            key = f"{prefix}.{i}.{g.linears[0]}"
            weights = [weight_nk(block.get_submodule(n)) for n in g.linears]
            alpha = config.alpha
            if config.alpha_grid:
                if key in mine:
                    x = stats[key].samples
                    with shard.phase(key, "quant"):
                        alpha = min(config.alpha_grid, key=lambda a: _w8a8_error(
                            x, weights, smoothing_scales(stats[key].absmax, weights, a), config.act,
                            config.act_symmetric))
                alpha = shard.share(key, alpha)
            # every rank folds the same scales (same statistics, same alpha)
            s = smoothing_scales(stats[key].absmax, weights, alpha)
            fold_scales(block, g, s)
            # the layers now see X / s: keep their statistics consistent
            for n in g.linears:
                st = stats.get(f"{prefix}.{i}.{n}")
                if st is not None:
                    st.divide_(s)
    quantize_owned(model, paths, config, shard, stats)
