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
from .archs import ARCHITECTURES, head_dim
from .extract import ModelSpec, extract

_MARK = "llmeq_rotation"  # on the model: how it was rotated (a dict), once rotated
ROTATIONS = (None, "hadamard")  # what QuantConfig.rotate / search(rotate=) take


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


def _times_r(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x @ R`` along the last dim, ``R = diag(signs) Q`` (``Q = hadamard.matrix(n)``)."""
    return hadamard.rotate(x * signs, inverse=True)


@torch.no_grad()
def _rotate_v_o(v: nn.Linear, o: nn.Linear, hd: int, where: str) -> None:
    """Each head's values ``v_h -> v_h M``; ``o_proj``'s columns of head h ``-> W_h M``
    (``M = hadamard.matrix(head_dim)``)."""
    if v.weight.shape[0] % hd or o.weight.shape[1] % hd:
        raise ValueError(f"rotate: {where}: v rows {v.weight.shape[0]} / o columns {o.weight.shape[1]} are not "
                         f"whole heads of {hd}")
    Wv = v.weight.double().reshape(-1, hd, v.weight.shape[1])  # [kv heads, hd, in]
    # M^T W_h = (W_h^T M)^T
    _set(v.weight, hadamard.rotate(Wv.transpose(1, 2), inverse=True).transpose(1, 2).reshape(v.weight.shape))
    if v.bias is not None:
        _set(v.bias, hadamard.rotate(v.bias.double().reshape(-1, hd), inverse=True).reshape(-1))
    Wo = o.weight.double().reshape(o.weight.shape[0], -1, hd)  # [out, heads, hd]
    _set(o.weight, hadamard.rotate(Wo, inverse=True).reshape(o.weight.shape))


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
    hd = head_dim(model.config)
    if facts.v_o is not None and not hadamard.supported(hd):
        raise ValueError(f"rotate: head_dim {hd} has no Hadamard matrix here (orders m * 2**k, m = 1, 2 or a "
                         "Paley order)")
    online_orders = {f"{spec.arch.layers_path}.{i}.{p}": _weight(block.get_submodule(p)).shape[1]
                     for i, block in enumerate(spec.blocks) for p in facts.online} if online else {}
    for path, k in online_orders.items():  # every check before the first weight changes
        if not hadamard.supported(k):
            raise ValueError(f"rotate: {path} reads {k} channels, an order with no Hadamard matrix "
                             "here; pass online=False to rotate without the online rotation")
    signs = hadamard.random_signs(n, seed, embed.weight.device)  # R = diag(signs) Q, applied as butterflies
    untied = _untie_head(model, embed, head)

    norm_groups = [g for g in spec.arch.groups if g.prev_kind == "norm"]
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
                _set(lin.weight, _times_r(lin.weight.double(), signs))
        for p in facts.writers:
            lin = block.get_submodule(p)
            _set(_weight(lin), _times_r(lin.weight.double().T, signs).T)  # R^T W = (W^T R)^T
            if lin.bias is not None:
                _set(lin.bias, _times_r(lin.bias.double(), signs))
        if facts.v_o is not None:
            _rotate_v_o(block.get_submodule(facts.v_o[0]), block.get_submodule(facts.v_o[1]), hd, where)
        for p in facts.online if online else ():
            lin = block.get_submodule(p)
            k = online_orders[f"{where}.{p}"]
            input_rotation.rotate_weight_inputs(lin, k)
            input_rotation.attach(lin, k)
    _fold_norm(final, [head], facts.norm_offset)
    _set(_weight(head), _times_r(head.weight.double(), signs))
    _set(embed.weight, _times_r(embed.weight.double(), signs))

    done = {"kind": "hadamard", "seed": seed, "hidden": n, "online": online,
            "head_dim_v_o": facts.v_o is not None, "untied_head": untied}
    setattr(model, _MARK, done)
    logger.info("rotate: %s residual stream (order %d = %s), %d online rotations, values per head: %s%s",
                spec.model_type, n, "x".join(map(str, hadamard.factor(n))), len(online_orders), facts.v_o is not None,
                "; LM head untied from the embedding" if untied else "")
    return done


def check_kind(kind, who: str) -> None:
    if kind not in ROTATIONS:
        raise ValueError(f"{who}: rotate must be one of {', '.join(map(repr, ROTATIONS))}, got {kind!r}")


def ensure_rotated(model: nn.Module, kind: Optional[str], spec: Optional[ModelSpec] = None, *, seed: int = 0,
                   online: bool = True, who: str = "rotate") -> bool:
    """The pre-transform step of ``quantize`` and ``search``: rotate ``model``
    as ``kind`` says unless it already is (then logged, not rotated twice).
    True when it rotated now (the caller's ModelSpec is then stale)."""
    check_kind(kind, who)
    if kind is None:
        return False
    if rotated(model) is not None:
        logger.info("%s: the model is already rotated (%s); not rotating again", who, rotated(model))
        return False
    rotate(model, spec, seed=seed, online=online)
    return True
