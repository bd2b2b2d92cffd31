"""Rotating a model's residual stream by a randomised Hadamard matrix
(QuaRot-style incoherence processing), exactly equivalent in float.

With the norms folded into the linears that read them, an RMSNorm commutes
with any orthogonal ``R`` (``|x R| = |x|``), so the stream can run in the
basis ``x R``: the embedding and every reader take ``R`` on their input
side, every writer ``R^T`` on its output side. What it buys is quantization:
``W R`` and ``x R`` have their outlier channels spread over all channels
(weights and activations both quantize with less error), at no cost at run
time. Two more rotations the stream does not cover:

* per head, values rotated by a ``head_dim`` Hadamard ``M`` (``v_proj``'s
  rows) and un-rotated in ``o_proj``'s input columns — offline, exact;
* ``down_proj``'s input (``act(gate) * up``: no linear op before it to fold
  into) rotated online by the intermediate width's Hadamard
  (:mod:`llmeasyquant.nn.input_rotation`), its weight offline.

The architecture facts come from :class:`~.archs.RotationFacts`; a type that
declares none is refused (LayerNorm's mean, output norms, fused experts).
All products are computed in float64 and cast back to the weights' dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import hadamard
from ..log import logger
from ..nn import input_rotation
from .archs import ARCHITECTURES
from .extract import ModelSpec, extract

_MARK = "llmeq_rotation"  # on the model: how it was rotated (a dict), once rotated


def rotated(model: nn.Module) -> Optional[dict]:
    return getattr(model, _MARK, None)


def _supported_types() -> str:
    return ", ".join(sorted({t for a in ARCHITECTURES if a.rotation is not None for t in a.model_types}))


def _check_norm(norm: nn.Module, where: str) -> None:
    # an RMSNorm has a weight and nothing else; a LayerNorm subtracts the mean
    # (not rotation-invariant) and usually has a bias
    name = type(norm).__name__
    if "RMSNorm" not in name or getattr(norm, "bias", None) is not None or getattr(norm, "weight", None) is None:
        raise ValueError(f"rotate: {where} is a {name}; expected an RMSNorm with a weight and no bias (a rotation "
                         "commutes only with a norm that neither subtracts the mean nor adds a bias)")


def _weight(module: nn.Module) -> torch.Tensor:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"rotate: expected an nn.Linear (rotate before quantizing), got {type(module).__name__}")
    return module.weight


@torch.no_grad()
def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    """``normalize(x) * (offset + w)`` feeding ``readers`` -> ``normalize(x)``
    (``w = 1 - offset``) with ``diag(offset + w)`` in the readers' columns."""
    g = norm.weight.double() + offset
    for lin in readers:
        _set(lin.weight, lin.weight.double() * g.unsqueeze(0))
    norm.weight.fill_(1.0 - offset)


def _untie_head(model: nn.Module, embed: nn.Module, head: nn.Module) -> bool:
    # the embedding takes R on its rows and the head the final norm and R on
    # its columns: once the norm is folded they are no longer one matrix
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


def _head_dim(model: nn.Module) -> int:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


@torch.no_grad()
def _rotate_v_o(v: nn.Linear, o: nn.Linear, M: torch.Tensor, where: str) -> None:
    """Each head's values ``v_h -> v_h M``; ``o_proj``'s columns of head h ``-> W_h M``."""
    hd = M.shape[0]
    if v.weight.shape[0] % hd or o.weight.shape[1] % hd:
        raise ValueError(f"rotate: {where}: v rows {v.weight.shape[0]} / o columns {o.weight.shape[1]} are not "
                         f"whole heads of {hd}")
    Wv = v.weight.double().reshape(-1, hd, v.weight.shape[1])  # [kv heads, hd, in]
    _set(v.weight, torch.einsum("dj,hdi->hji", M, Wv).reshape(v.weight.shape))  # M^T W_h
    if v.bias is not None:
        _set(v.bias, (v.bias.double().reshape(-1, hd) @ M).reshape(-1))
    Wo = o.weight.double().reshape(o.weight.shape[0], -1, hd)  # [out, heads, hd]
    _set(o.weight, (Wo @ M).reshape(o.weight.shape))


@torch.no_grad()
def rotate(model: nn.Module, spec: Optional[ModelSpec] = None, *, seed: int = 0, online: bool = True) -> dict:
    """Rotate ``model`` (float, not yet quantized) in place; returns what was
    done (also kept as ``model.llmeq_rotation``). The float model computes the
    same logits up to float rounding. ``seed`` draws the random signs of the
    residual rotation ``R = diag(s) H / sqrt(n)``; ``online=False`` skips the
    online rotation before ``down_proj`` (then nothing runs at inference that
    the float model did not)."""
    if rotated(model) is not None:
        raise ValueError(f"rotate: the model is already rotated ({rotated(model)})")
    spec = spec or extract(model)
    facts = spec.arch.rotation
    if facts is None:
        raise ValueError(f"rotate: no rotation is declared for model type {spec.model_type!r}; supported: "
                         f"{_supported_types()} (models/archs.py RotationFacts)")
    embed = model.get_submodule(facts.embed)
    head = model.get_submodule(facts.head)
    final = model.get_submodule(spec.arch.final[0])
    _check_norm(final, spec.arch.final[0])
    n = embed.weight.shape[1]
    if not hadamard.supported(n):
        raise ValueError(f"rotate: hidden size {n} has no Hadamard matrix here (orders m * 2**k, m = 1, 2 or "
                         "a Paley order)")
    dev = embed.weight.device
    R = hadamard.random_signs(n, seed, dev).unsqueeze(1) * hadamard.matrix(n, torch.float64, dev)
    untied = _untie_head(model, embed, head)

    norm_groups = [g for g in spec.arch.groups if g.prev_kind == "norm"]
    hd = _head_dim(model)
    M = hadamard.matrix(hd, torch.float64, dev) if facts.v_o is not None else None
    online_orders: dict[str, int] = {}
    for i, block in enumerate(spec.blocks):
        where = f"{spec.arch.layers_path}.{i}"
        for g in norm_groups:
            norm = block.get_submodule(g.prev)
            _check_norm(norm, f"{where}.{g.prev}")
            readers = [block.get_submodule(p) for p in g.linears]
            for lin in readers:
                _weight(lin)
            _fold_norm(norm, readers, facts.norm_offset)
            for lin in readers:
                _set(lin.weight, lin.weight.double() @ R)
        for p in facts.writers:
            lin = block.get_submodule(p)
            _set(_weight(lin), R.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ R)
        if M is not None:
            _rotate_v_o(block.get_submodule(facts.v_o[0]), block.get_submodule(facts.v_o[1]), M, where)
        if online:
            for p in facts.online:
                lin = block.get_submodule(p)
                k = _weight(lin).shape[1]
                if not hadamard.supported(k):
                    raise ValueError(f"rotate: {where}.{p} reads {k} channels, an order with no Hadamard matrix "
                                     "here; pass online=False to rotate without the online rotation")
                input_rotation.rotate_weight_inputs(lin, k)
                input_rotation.attach(lin, k)
                online_orders[f"{where}.{p}"] = k
    _fold_norm(final, [head], facts.norm_offset)
    _set(_weight(head), head.weight.double() @ R)
    _set(embed.weight, embed.weight.double() @ R)

    done = {"kind": "hadamard", "seed": seed, "hidden": n, "online": online, "head_dim_v_o": M is not None,
            "untied_head": untied}
    setattr(model, _MARK, done)
    logger.info("rotate: %s residual stream (order %d = %s), %d online rotations, values per head: %s%s",
                spec.model_type, n, "x".join(map(str, hadamard.factor(n))), len(online_orders), M is not None,
                "; LM head untied from the embedding" if untied else "")
    return done
