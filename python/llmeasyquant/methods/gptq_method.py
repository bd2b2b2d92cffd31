"""GPTQ on a whole model: block by block, each block's linears quantized with
the Hessian of the inputs they receive from the already-quantized blocks
before them. The per-layer algorithm is :func:`.gptq.gptq_quantize`.

All linears of a block are quantized from one pass over the block (not
"true-sequential" within the block): simpler, and for the attention/MLP
sub-groups the difference is small in the GPTQ paper's ablation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._reference import scale_dtype_of
from ..calibration import BlockInputs, observe_block, run_blockwise
from ..sharding import Shard
from ..models.extract import ModelSpec
from ..nn.qlinear import QLinear
from ._common import quantize_owned, swap, target_paths, weight_nk
from .gptq import gptq_quantize


def quantized_from(module: nn.Module, config, q, scale, zero_point) -> QLinear:
    """A QLinear holding integer weights a method computed (bias copied)."""
    W = weight_nk(module)
    N, K = W.shape
    bias = getattr(module, "bias", None)
    ql = QLinear(K, N, bias is not None, w_bits=config.w_bits, w_group_size=config.w_group_size,
                 w_symmetric=config.w_symmetric, act=config.act, act_symmetric=config.act_symmetric,
                 bias_dtype=bias.dtype if bias is not None else torch.float32, w_scale_dtype=config.w_scale_dtype)
    ql.set_quantized(q, scale, zero_point if not config.w_symmetric else None)
    if bias is not None:
        ql.bias.copy_(bias.detach())
    return ql


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True,
          shard: Optional[Shard] = None) -> None:
    if config.act not in (None, "dynamic"):
        raise ValueError(f"gptq: act={config.act!r} is not supported (weight-only or dynamic activations)")
    shard = shard or Shard()
    wanted = set(target_paths(model, spec, config.exclude))
    prefix = spec.arch.layers_path

    def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        key = f"{prefix}.{i}"
        names = [n for n in spec.block_linears if f"{key}.{n}" in wanted]
        shapes = {n: weight_nk(block.get_submodule(n)).shape for n in names}
        # Cholesky O(K^3) + column sweep O(N K^2)
        mine = shard.assign([f"{key}.{n}" for n in names],
                            [shapes[n][1] ** 2 * (shapes[n][0] + shapes[n][1]) for n in names])
        # data-parallel: every rank adds its batches' part of every Hessian;
        # replicated calibration: only the owner needs a layer's Hessian
        observed = names if shard.data_parallel else [n for n in names if f"{key}.{n}" in mine]
        hessians = {n: torch.zeros(shapes[n][1], shapes[n][1], dtype=torch.float64) for n in observed}

        def accumulate(n: str, x: torch.Tensor) -> None:
            xd = x.double()
            hessians[n].add_(xd.T @ xd)

        with shard.phase(key, "calib"):
            observe_block(block, inputs, observed, accumulate)
        for n in observed:
            shard.reduce_to_owner_(f"{key}.{n}", hessians[n])
        for n in names:
            if f"{key}.{n}" not in mine:
                continue
            mod = block.get_submodule(n)
            with shard.phase(f"{key}.{n}", "load"):
                W = weight_nk(mod).float()
            with shard.phase(f"{key}.{n}", "quant"):
                r = gptq_quantize(W, hessians[n], bits=config.w_bits, group_size=config.w_group_size,
                                  symmetric=config.w_symmetric, block_size=config.block_size, damp=config.damp,
                                  act_order=config.act_order, scale_dtype=scale_dtype_of(config.w_scale_dtype))
                swap(block, n, quantized_from(mod, config, r.q, r.scale, r.zero_point))
        shard.barrier(key)
        shard.gather_modules(block, names, key)

    run_blockwise(model, spec.blocks, calib, process, desc="GPTQ", progress=progress,
                  forward_context=lambda i, block: shard.forward_times(block, f"{prefix}.{i}"))
    # outside the blocks: round-to-nearest
    quantize_owned(model, [p for p in spec.extra_linears if p in wanted], config, shard)
