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

import torch
from torch import nn

from ..calibration import BlockInputs, ChannelStats, observe_block, run_blockwise
from ..models.extract import ModelSpec
from ._common import fold_scales, swap, target_paths, to_qlinear, weight_nk
from .awq import apply_clip, awq_search_clip, awq_search_scale

_KEEP_TOKENS = 4096  # calibration rows kept per linear input for the searches


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True) -> None:
    if config.act not in (None, "dynamic"):
        raise ValueError(f"awq: act={config.act!r} is not supported (weight-only or dynamic activations)")
    wanted = set(target_paths(model, spec, config.exclude))
    prefix = spec.arch.layers_path

    def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        names = [n for n in spec.block_linears if f"{prefix}.{i}.{n}" in wanted]
        per_batch = max(1, _KEEP_TOKENS // max(1, len(inputs.hidden)))
        xs = {n: ChannelStats.empty(weight_nk(block.get_submodule(n)).shape[1], keep_tokens=_KEEP_TOKENS)
              for n in names}

        def keep(n: str, x: torch.Tensor) -> None:
            idx = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0])).round().long()
            xs[n].update(x[idx].float())

        observe_block(block, inputs, names, keep)
        for g in spec.groups:
            if not all(n in xs for n in g.linears):
                continue
            weights = [weight_nk(block.get_submodule(n)).float() for n in g.linears]
            res = awq_search_scale(weights, xs[g.linears[0]].samples, bits=config.w_bits,
                                   group_size=config.w_group_size, symmetric=config.w_symmetric, grid=config.grid)
            fold_scales(block, g, res.scale)
            for n in g.linears:
                xs[n].divide_(res.scale)
        for n in names:
            mod = block.get_submodule(n)
            if config.clip:
                W = weight_nk(mod).float()
                clip = awq_search_clip(W, xs[n].samples, bits=config.w_bits, group_size=config.w_group_size,
                                       symmetric=config.w_symmetric)
                clipped = apply_clip(W, clip)
                with torch.no_grad():
                    if isinstance(mod, nn.Linear):
                        mod.weight.copy_(clipped)
                    else:  # Conv1D stores [in, out]
                        mod.weight.copy_(clipped.t())
            swap(block, n, to_qlinear(mod, config))

    run_blockwise(model, spec.blocks, calib, process, desc="AWQ", progress=progress)
    for p in spec.extra_linears:
        if p in wanted:
            swap(model, p, to_qlinear(model.get_submodule(p), config))
