"""Tensor-parallel QLinear in the Megatron layout.

* Column-parallel: rank r holds output channels [r N/P, (r+1) N/P) - their
  integer weights, per-channel (or per-group) scales, zero-points and bias.
  Activations are replicated, so per-token activation quantization is the
  single-device one; the output stays sharded (it feeds a row-parallel layer)
  unless ``gather_output``.
* Row-parallel: rank r holds input channels [r K/P, (r+1) K/P) of every output
  channel. Per-channel weight scales are the same on every rank (a K split does
  not change them); group-wise weights split on group boundaries. Per-token
  activation ranges need the *whole* row: the local min/max (M numbers) are
  all-reduced first, so every rank quantizes with the single-device scales.
  Partial outputs are all-reduced (sum) in the output dtype, then the bias is
  added once.

Integer accumulation is exact on each rank; the only difference from one
device is the float sum of P partial outputs (a few ulps).

:func:`shard_block` applies this to a decoder block (attention: q/k/v
column, o row; MLP: gate/up column, down row) of the architectures whose
attention derives its head count from the projection width (LLaMA-like, OPT):
the layouts are declared with the architectures (``models/archs.py``, ``ArchSpec.tp``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import ops, quant_format
from ..models.archs import declared_variants, tp_layout, tp_model_types
from ..nn.qlinear import QLinear
from .runtime import collective

def _int_weight(ql: QLinear) -> torch.Tensor:
    """The integer weight values [N, K] as int8 (packed storage unpacked)."""
    return quant_format.unpack_bits(ql.qweight, ql.storage_bits, ql.in_features)


def _slice(ql: QLinear, rows: slice, cols: slice, keep_bias: bool) -> QLinear:
    whole_k = cols.start == 0 and cols.stop == ql.in_features
    if ql.in_perm is not None and not whole_k:
        raise ValueError("row-parallel split of an act-order layer (QLinear.in_perm): its permuted input columns "
                         "do not split into contiguous shards; split it column-parallel or load it on one rank")
    q = _int_weight(ql)[rows, cols]
    N, K = q.shape
    if ql.w_group_size > 0:
        if K % ql.w_group_size or cols.start % ql.w_group_size:
            raise ValueError(f"row-parallel split of K={ql.in_features} into {K}-column shards does not fall on "
                             f"group boundaries (group size {ql.w_group_size})")
        gcols = slice(cols.start // ql.w_group_size, cols.stop // ql.w_group_size)
    else:
        gcols = slice(None)
    has_bias = keep_bias and ql.bias is not None
    out = QLinear(K, N, has_bias, w_bits=ql.w_bits, w_group_size=ql.w_group_size, w_symmetric=ql.w_symmetric,
                  act=ql.act, act_symmetric=ql.act_symmetric, ema_alpha=ql.ema_alpha, ema_eps=ql.ema_eps,
                  bias_dtype=ql.bias.dtype if ql.bias is not None else torch.float32, w_scale_dtype=ql.w_scale.dtype,
                  in_perm=ql.in_perm is not None, device=ql.qweight.device)
    out.set_quantized(q, ql.w_scale[rows, gcols], None if ql.w_zero is None else ql.w_zero[rows, gcols])
    if ql.in_perm is not None:
        out.set_in_perm(ql.in_perm)
    if has_bias:
        out.bias.copy_(ql.bias[rows])
    if ql.act == "static":
        out.act_scale.copy_(ql.act_scale)
        out.act_zero.copy_(ql.act_zero)
    return out


def _check_split(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"tensor parallelism over {world} ranks needs {what} divisible by {world}, got {n}")
    return n // world


class ColumnParallelQLinear(nn.Module):
    def __init__(self, local: QLinear, rank: int, world: int, gather_output: bool = False, group=None):
        super().__init__()
        self.local, self.rank, self.world, self.gather_output, self.group = local, rank, world, gather_output, group

    @classmethod
    def from_qlinear(cls, ql: QLinear, rank: int, world: int, gather_output: bool = False,
                     group=None) -> "ColumnParallelQLinear":
        n = _check_split(ql.out_features, world, "out_features")
        return cls(_slice(ql, slice(rank * n, (rank + 1) * n), slice(0, ql.in_features), True), rank, world,
                   gather_output, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        if not self.gather_output or self.world == 1:
            return y
        with collective("column-parallel all-gather"):
            parts = [torch.empty_like(y) for _ in range(self.world)]
            dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class RowParallelQLinear(nn.Module):
    def __init__(self, local: QLinear, bias: Optional[torch.Tensor], rank: int, world: int, group=None):
        super().__init__()
        if local.act == "ema":
            raise ValueError("row-parallel QLinear: act='ema' would track each rank's shard of the activation "
                             "range separately; use 'dynamic' or 'static' (or keep the layer unsharded)")
        self.local, self.rank, self.world, self.group = local, rank, world, group
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_qlinear(cls, ql: QLinear, rank: int, world: int, group=None) -> "RowParallelQLinear":
        k = _check_split(ql.in_features, world, "in_features")
        local = _slice(ql, slice(0, ql.out_features), slice(rank * k, (rank + 1) * k), False)
        return cls(local, ql.bias, rank, world, group)

    def _all_reduce(self, t: torch.Tensor, op, what: str) -> torch.Tensor:
        if self.world > 1:
            with collective(what):
                dist.all_reduce(t, op=op, group=self.group)
        return t

    def _token_quant(self, x2: torch.Tensor):
        """Per-token 8-bit quantization with ranges over the full K (all ranks)."""
        if self.local.act_symmetric:
            amax = self._all_reduce(x2.abs().amax(dim=1).float(), dist.ReduceOp.MAX, "row-parallel token absmax")
            scale = quant_format.scale_from_absmax(amax, 8)
            zero = torch.zeros_like(scale, dtype=torch.int8)
        else:
            both = torch.stack([-x2.amin(dim=1).float(), x2.amax(dim=1).float()])
            both = self._all_reduce(both, dist.ReduceOp.MAX, "row-parallel token min/max")
            scale, zero = quant_format.scale_zp_from_minmax(-both[0], both[1], 8)
        scale, zero = scale.reshape(-1, 1).contiguous(), zero.reshape(-1, 1).contiguous()
        return ops.quantize_static(x2, scale, zero, 8, -1), scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ql = self.local
        x2 = x.reshape(-1, ql.in_features)
        if ql.act is None:
            y = ql(x2)
        elif ql.act == "dynamic":
            qx, scale, zero = self._token_quant(x2)
            if ql.int8_gemm:
                y = ops.scaled_int8_gemm(qx, scale, ql.qweight, ql.scales().view(-1),
                                         a_zero=None if ql.act_symmetric else zero, b_sum=ql.w_sum, bias=None,
                                         out_dtype=x.dtype)
            else:
                xq = ops.dequantize(qx, scale, zero, 8, -1, ql.in_features, x.dtype)
                y = ops.weight_only_linear(xq, ql.qweight, ql.scales(), ql.w_zero, ql.storage_bits, ql.w_group_size,
                                           None)
        else:  # static: one calibrated per-tensor scale, the same on every rank
            y = ql(x2)
        y = self._all_reduce(y.contiguous(), dist.ReduceOp.SUM, "row-parallel all-reduce of partial outputs")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], ql.out_features)


def shard_block(block: nn.Module, model_type: str, rank: int, world: int, group=None) -> nn.Module:
    """Replace the block's QLinears by their tensor-parallel shards, in place."""
    from ..methods._common import swap
    from ..nn import input_rotation

    layout = tp_layout(model_type)
    moe = [a for a in declared_variants(model_type) if a.moe is not None]
    if moe:
        raise ValueError(f"tensor parallelism: {model_type!r} is a mixture-of-experts model; splitting its "
                         "per-expert linears over ranks (expert parallelism) is not built, and no layout is declared")
    if layout is None:
        raise ValueError(f"tensor parallelism: no layout for model type {model_type!r}; supported: "
                         f"{', '.join(sorted(tp_model_types()))} (a fused projection such as GPT-2's c_attn would "
                         "mix q, k and v heads; models/archs.py declares the layouts)")
    cols, rows = layout.columns, layout.rows
    attn = getattr(block, "self_attn", None)
    cfg = getattr(attn, "config", None)
    if cfg is not None:
        _check_split(cfg.num_attention_heads, world, "num_attention_heads")
        _check_split(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, world,
                     "num_key_value_heads")
    for name in cols + rows:
        ql = block.get_submodule(name)
        if input_rotation.size_of(ql) is not None:
            raise ValueError(f"tensor parallelism: {name} rotates its input online (a rotated model); the "
                             "rotation mixes every input channel, so a row split over ranks cannot apply it")
        if not isinstance(ql, QLinear):
            raise TypeError(f"shard_block: {name} is a {type(ql).__name__}; quantize the model first")
        new = (ColumnParallelQLinear.from_qlinear(ql, rank, world, group=group) if name in cols
               else RowParallelQLinear.from_qlinear(ql, rank, world, group=group))
        swap(block, name, new)
    return block
