"""GPTQ on a whole model: block by block, each block's linears quantized with
the Hessian of the inputs they receive from the already-quantized blocks
before them. The per-layer algorithm is :func:`.gptq.gptq_quantize`.

All linears of a block are quantized from one pass over the block (not
"true-sequential" within the block): simpler, and for the attention/MLP
sub-groups the difference is small in the GPTQ paper's ablation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import BlockInputs, observe_block, run_blockwise
from ..models.extract import ModelSpec
from ..nn.qlinear import QLinear
from ._common import swap, target_paths, to_qlinear, weight_nk
from .gptq import gptq_quantize


def quantized_from(module: nn.Module, config, q, scale, zero_point) -> QLinear:
    """A QLinear holding integer weights a method computed (bias copied)."""
    W = weight_nk(module)
    N, K = W.shape
    bias = getattr(module, "bias", None)
    ql = QLinear(K, N, bias is not None, w_bits=config.w_bits, w_group_size=config.w_group_size,
                 w_symmetric=config.w_symmetric, act=config.act, act_symmetric=config.act_symmetric,
                 bias_dtype=bias.dtype if bias is not None else torch.float32)
    ql.set_quantized(q, scale, zero_point if not config.w_symmetric else None)
    if bias is not None:
        ql.bias.copy_(bias.detach())
    return ql


@torch.no_grad()
def apply(model: nn.Module, spec: ModelSpec, config, calib, progress: bool = True) -> None:
    if config.act not in (None, "dynamic"):
        raise ValueError(f"gptq: act={config.act!r} is not supported (weight-only or dynamic activations)")
    wanted = set(target_paths(model, spec, config.exclude))
    prefix = spec.arch.layers_path

    def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        names = [n for n in spec.block_linears if f"{prefix}.{i}.{n}" in wanted]
        hessians: dict[str, torch.Tensor] = {}
        for n in names:
            K = weight_nk(block.get_submodule(n)).shape[1]
            hessians[n] = torch.zeros(K, K, dtype=torch.float64)

        def accumulate(n: str, x: torch.Tensor) -> None:
            xd = x.double()
            hessians[n].add_(xd.T @ xd)

        observe_block(block, inputs, names, accumulate)
        for n in names:
            mod = block.get_submodule(n)
            r = gptq_quantize(weight_nk(mod).float(), hessians[n], bits=config.w_bits,
                              group_size=config.w_group_size, symmetric=config.w_symmetric,
                              block_size=config.block_size, damp=config.damp, act_order=config.act_order)
            swap(block, n, quantized_from(mod, config, r.q, r.scale, r.zero_point))

    run_blockwise(model, spec.blocks, calib, process, desc="GPTQ", progress=progress)
    for p in spec.extra_linears:  # outside the blocks: round-to-nearest
        if p in wanted:
            swap(model, p, to_qlinear(model.get_submodule(p), config))
