"""Pieces every method uses: swapping linears for QLinear, folding scales."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..models.extract import ModelSpec
# the fold lives with the architecture knowledge (discovery verifies groups with it)
from ..models.fold import divide_output_channels, fold_scales, scale_input_channels  # noqa: F401
from ..pipeline import BlockHooks, PipelineReport, run_blocks
from ..sharding import Shard
from ..nn import input_rotation
from ..nn.qlinear import QLinear, _is_conv1d


def target_paths(model: nn.Module, spec: ModelSpec, exclude: Iterable[str]) -> list[str]:
    """Linears a method quantizes: those of the decoder blocks plus any other
    linear not excluded by name component (``lm_head`` by default)."""
    ex = tuple(exclude)
    paths = spec.linear_paths() + spec.extra_linears
    return [p for p in paths if not any(part in ex for part in p.split("."))]


def swap(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``; it keeps the old module's online input rotation."""
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    input_rotation.carry(getattr(owner, child), new)
    setattr(owner, child, new)


def weight_nk(module: nn.Module) -> torch.Tensor:
    """The float weight as [out, in] (Conv1D stores [in, out])."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def to_qlinear(module: nn.Module, config, **overrides) -> QLinear:
    kw = config.qlinear_kwargs()
    kw.update(overrides)
    return QLinear.from_linear(module, **kw)


def quantized_from(module: nn.Module, config, q, scale, zero_point) -> QLinear:
    """A QLinear holding integer weights a method computed (bias copied)."""
    W = weight_nk(module)
    N, K = W.shape
    bias = getattr(module, "bias", None)
    ql = QLinear(K, N, bias is not None, w_bits=config.w_bits, w_group_size=config.w_group_size,
                 w_symmetric=config.w_symmetric, act=config.act, act_symmetric=config.act_symmetric,
                 bias_dtype=bias.dtype if bias is not None else torch.float32, w_scale_dtype=config.w_scale_dtype,
                 device=W.device)
    ql.set_quantized(q, scale, zero_point if not config.w_symmetric else None)
    if bias is not None:
        ql.bias.copy_(bias.detach())
    return ql


def weight_cost(module: nn.Module) -> float:
    """Work of quantizing a layer, for partitioning layers over ranks."""
    return float(weight_nk(module).numel())


@torch.no_grad()
def quantize_owned(root: nn.Module, names: list[str], config, shard, stats: dict | None = None,
                   prefix: str = "") -> None:
    """Round-to-nearest the linears ``names`` (paths under ``root``) this rank
    owns, then every rank receives the others' (single process: all of them).
    ``stats`` (full path -> ChannelStats) sets calibrated static ranges."""
    full = {n: f"{prefix}.{n}" if prefix else n for n in names}
    mine = shard.assign([full[n] for n in names], [weight_cost(root.get_submodule(n)) for n in names])
    for n in names:
        if full[n] not in mine:
            continue
        with shard.phase(full[n], "quant"):
            q = to_qlinear(root.get_submodule(n), config)
            if config.act == "static":
                st = stats[full[n]]
                if not st.seen:
                    raise ValueError(f"{config.method}: static activations need a calibrated range for every "
                                     f"layer, and {full[n]} saw no calibration token (an expert no token was "
                                     "routed to): use more calibration data or act='dynamic'")
                q.set_static_range(st.min.min(), st.max.max())
            swap(root, n, q)
    shard.barrier(prefix or "model")
    shard.gather_modules(root, names, prefix)


def quantize_blockwise(model: nn.Module, spec: ModelSpec, config, calib, hooks: BlockHooks, *, progress: bool,
                       shard: Shard | None, device) -> PipelineReport:
    """A layer-wise weight method on a whole model (GPTQ, AWQ): ``hooks`` over
    the decoder blocks (weight-only or dynamic activations), then
    round-to-nearest for the target linears outside the blocks."""
    if config.act not in (None, "dynamic"):
        raise ValueError(f"{config.method}: act={config.act!r} is not supported (weight-only or dynamic activations)")
    shard = shard or Shard()
    wanted = set(target_paths(model, spec, config.exclude))
    report = run_blocks(model, spec, calib, hooks, targets=wanted, shard=shard, progress=progress, device=device)
    quantize_owned(model, [p for p in spec.extra_linears if p in wanted], config, shard)
    return report
