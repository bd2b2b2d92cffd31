"""AWQ on a whole model, block by block: for each scale group (linears that
share an input), search the activation-aware per-channel scale, fold it into
the preceding norm/linear (exact in float), then search per-group weight
clipping for each linear and round to nearest. The per-layer searches are in
:mod:`.awq`.

The scale search measures the error of the group's own linear outputs (the
AWQ reference measures the whole attention/MLP sub-block output); this keeps
the method architecture-agnostic.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..calibration import BlockInputs, ChannelStats, observe_block, run_blockwise
from ..sharding import Shard
from ..models.extract import ModelSpec
from ._common import fold_scales, quantize_owned, swap, target_paths, to_qlinear, weight_nk
from .awq import apply_clip, awq_search_clip, awq_search_scale

_KEEP_TOKENS = 4096  # calibration rows kept per linear input for the searches


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True,
          shard: Optional[Shard] = None) -> None:
    if config.act not in (None, "dynamic"):
        raise ValueError(f"awq: act={config.act!r} is not supported (weight-only or dynamic activations)")
    shard = shard or Shard()
    wanted = set(target_paths(model, spec, config.exclude))
    prefix = spec.arch.layers_path

    def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        key = f"{prefix}.{i}"
        names = [n for n in spec.block_linears if f"{key}.{n}" in wanted]
        # data-parallel: every rank keeps its share, so the union is ~_KEEP_TOKENS rows
        batches_in_all = len(inputs.hidden) * (shard.world if shard.data_parallel else 1)
        per_batch = max(1, _KEEP_TOKENS // max(1, batches_in_all))
        xs = {n: ChannelStats.empty(weight_nk(block.get_submodule(n)).shape[1], keep_tokens=_KEEP_TOKENS)
              for n in names}

        def keep(n: str, x: torch.Tensor) -> None:
            idx = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0])).round().long()
            xs[n].update(x[idx].float())

        with shard.phase(key, "calib"):
            observe_block(block, inputs, names, keep)
        shard.reduce_stats_({f"{key}.{n}": xs[n] for n in names})
        groups = [g for g in spec.groups if all(n in xs for n in g.linears)]
        gkeys = [f"{key}.{g.linears[0]}/scale" for g in groups]
        mine = shard.assign(gkeys, [sum(weight_nk(block.get_submodule(n)).numel() for n in g.linears)
                                    for g in groups])
        for g, gk in zip(groups, gkeys):
            scale = None
            if gk in mine:
                with shard.phase(f"{key}.{g.linears[0]}", "quant"):
                    weights = [weight_nk(block.get_submodule(n)).float() for n in g.linears]
                    scale = awq_search_scale(weights, xs[g.linears[0]].samples, bits=config.w_bits,
                                             group_size=config.w_group_size, symmetric=config.w_symmetric,
                                             grid=config.grid).scale
            scale = shard.share(gk, scale)
            fold_scales(block, g, scale)
            for n in g.linears:
                xs[n].divide_(scale)
        owned = shard.assign([f"{key}.{n}" for n in names], [weight_nk(block.get_submodule(n)).numel() for n in names])
        for n in names:
            if f"{key}.{n}" not in owned:
                continue
            mod = block.get_submodule(n)
            with shard.phase(f"{key}.{n}", "quant"):
                if config.clip:
                    W = weight_nk(mod).float()
                    clip = awq_search_clip(W, xs[n].samples, bits=config.w_bits, group_size=config.w_group_size,
                                           symmetric=config.w_symmetric)
                    clipped = apply_clip(W, clip)
                    if isinstance(mod, nn.Linear):
                        mod.weight.copy_(clipped)
                    else:  # Conv1D stores [in, out]
                        mod.weight.copy_(clipped.t())
                swap(block, n, to_qlinear(mod, config))
        shard.barrier(key)
        shard.gather_modules(block, names, key)

    run_blockwise(model, spec.blocks, calib, process, desc="AWQ", progress=progress,
                  forward_context=lambda i, block: shard.forward_times(block, f"{prefix}.{i}"))
    quantize_owned(model, [p for p in spec.extra_linears if p in wanted], config, shard)
