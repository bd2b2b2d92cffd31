"""The generic fallback for a model type no :class:`ArchSpec` declares.

* Blocks: the ``nn.ModuleList`` whose modules are of a class the model names
  in ``_no_split_modules`` (transformers' own "one decoder layer" marker);
  else the largest outermost ``nn.ModuleList`` of modules of one class.
* Linears: the quantizable modules of block 0; every block must have the same
  names (else the model is refused: a method would quantize some blocks only).
* Scale groups (only SmoothQuant and AWQ need them, so only computed when
  asked): one random batch (no calibration data) runs up to block 0, then a
  copy of block 0 runs with forward hooks. A norm-like module (a LayerNorm /
  RMSNorm-like class with one weight of the width of its consumers) whose
  output is *exactly* the input tensor of some linears (same tensor, or same
  data_ptr, shape, strides and dtype) feeds them directly. Each candidate is
  then verified: random positive scales folded into a copy of the block must
  leave the block's outputs unchanged to float tolerance, with the norm
  applying ``x*w`` or else ``x*(1+w)`` (Gemma-like); a candidate that fails
  both is skipped with a warning, never folded. Linear -> linear groups
  (v -> o, up -> down) are not discovered.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..log import logger
from ..nn.qlinear import QLinear
from ..nn.replace import is_quantizable
from .archs import ArchSpec, KVFacts, ScaleGroup
from .fold import fold_scales

# relative tolerance of the folding check: float32 rounding of a block is
# ~1e-6 relative; a wrong fold with scales in [0.5, 2] moves outputs by
# orders of magnitude more (tests: > 1e-3 on the logits)
VERIFY_RTOL = 1e-4
_DISCOVERY_TOKENS = 8
_WEIGHT_OFFSETS = (0.0, 1.0)  # x*w, then x*(1+w)


def _is_linear(m: nn.Module) -> bool:
    return is_quantizable(m) or isinstance(m, QLinear)


def _identical_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of >= 1 modules of one class, in model order."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(path of the decoder blocks' ModuleList, the blocks); ValueError if none."""
    lists = _identical_lists(model)
    marked = set(getattr(model, "_no_split_modules", None) or ())
    pool = [(p, m) for p, m in lists if type(m[0]).__name__ in marked]
    if not pool:  # outermost lists only: a list inside a block (experts, ...) is not the stack of blocks
        pool = [(p, m) for p, m in lists if not any(p.startswith(q + ".") for q, _ in lists)]
    if not pool:
        raise ValueError("the generic fallback found no decoder blocks: expected an nn.ModuleList of modules of "
                         "one class (or of a class named in the model's _no_split_modules), got none")
    path, blocks = max(pool, key=lambda pm: len(pm[1]))  # first of the longest
    return path, list(blocks)


def block_linears(blocks: Sequence[nn.Module], layers_path: str) -> tuple[str, ...]:
    """Quantizable linears of block 0, checked to be the same in every block."""
    names = tuple(n for n, m in blocks[0].named_modules() if _is_linear(m))
    if not names:
        raise ValueError(f"the generic fallback found no linear in {layers_path}.0 "
                         f"(a {type(blocks[0]).__name__}): expected nn.Linear / Conv1D modules")
    for i, block in enumerate(blocks[1:], 1):
        mine = tuple(n for n, m in block.named_modules() if _is_linear(m))
        if mine != names:
            raise ValueError(f"the generic fallback needs identical blocks: expected {layers_path}.{i} to have "
                             f"the linears of block 0 ({', '.join(names)}), got {', '.join(mine) or 'none'}")
    return names


def _is_norm_like(m: nn.Module) -> bool:
    """A LayerNorm / RMSNorm-like module: one 1-D weight (and a bias of the
    same shape), nothing else holding parameters."""
    if _is_linear(m) or isinstance(m, nn.Embedding):
        return False
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return False
    params = dict(m.named_parameters())
    if set(params) - {"weight", "bias"} or ("bias" in params and params["bias"].shape != w.shape):
        return False
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(m).__name__.lower()


def fallback_final(model: nn.Module, layers_path: str) -> tuple[str, ...]:
    """Norm-like modules registered after the blocks in their parent (the
    final norm the search's loss runs before the head)."""
    parent_path, _, child = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    names = [n for n, _ in parent.named_children()]
    after = names[names.index(child) + 1:]
    return tuple(f"{parent_path}.{n}" if parent_path else n for n in after
                 if _is_norm_like(getattr(parent, n)))


def fallback_spec(model: nn.Module, model_type: str) -> ArchSpec:
    """An ArchSpec from the generic fallback (no scale groups: see
    :func:`discover_groups`)."""
    path, blocks = find_blocks(model)
    linears = block_linears(blocks, path)
    return ArchSpec(model_types=(model_type,), layers_path=path, linears=linears, groups=(),
                    final=fallback_final(model, path),
                    kv=KVFacts(cache_api=False, unsupported=f"{model_type!r} is not a declared architecture, so "
                               "nothing says its attention stores K/V through the transformers Cache API"),
                    representative=linears[-1], declared=False, variant="generic fallback")


# --------------------------------------------------------------------------
# scale groups
# --------------------------------------------------------------------------
@dataclass
class Discovery:
    """What discovery found in block 0: verified groups, and the candidates
    that failed verification (with why)."""

    groups: tuple[ScaleGroup, ...] = ()
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (candidate, reason)


class _Stop(Exception):
    pass


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not n:
        raise ValueError(f"discovering scale groups runs one random batch: expected {type(model).__name__} to have "
                         "get_input_embeddings() or config.vocab_size, got neither")
    return int(n)


@torch.no_grad()
def _block_inputs(model: nn.Module, block: nn.Module) -> tuple[torch.Tensor, tuple, dict]:
    """What block 0 receives for one random batch (the model runs up to it)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab_size(model), (1, _DISCOVERY_TOKENS), generator=g)
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["args"], seen["kwargs"] = tuple(args[1:]), dict(kwargs)
        raise _Stop

    dev = next(model.parameters()).device
    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(ids.to(dev), use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    if "hidden" not in seen:
        raise ValueError("discovering scale groups: the model's forward never reached decoder block 0")
    return seen["hidden"], seen["args"], seen["kwargs"]


def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _run(block: nn.Module, hidden, args, kwargs) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def _candidates(block: nn.Module, linears: Sequence[str], inputs) -> list[tuple[str, tuple[str, ...]]]:
    """(norm, the linears that read its output tensor itself), block order."""
    norms = [n for n, m in block.named_modules() if n and _is_norm_like(m)]
    linears = [n for n in linears if is_quantizable(block.get_submodule(n))]  # a QLinear has no float weight to scale
    outs: dict[str, list] = {n: [] for n in norms}
    ins: dict[str, list] = {n: [] for n in linears}
    handles = []
    for n in norms:  # the lists hold the tensors: no storage is reused while matching
        handles.append(block.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: outs[n].append(o) if isinstance(o, torch.Tensor) else None))
    for n in linears:
        handles.append(block.get_submodule(n).register_forward_pre_hook(
            lambda m, a, kw, n=n: ins[n].append(a[0] if a else kw.get("input")), with_kwargs=True))
    try:
        _run(block, *inputs)
    finally:
        for h in handles:
            h.remove()
    found = []
    for n in norms:
        width = block.get_submodule(n).weight.numel()
        readers = tuple(l for l in linears
                        if any(isinstance(x, torch.Tensor) and x.shape[-1] == width and _same_tensor(x, o)
                               for x in ins[l] for o in outs[n]))
        if readers:
            found.append((n, readers))
    return found


def _folds_exactly(block: nn.Module, group: ScaleGroup, inputs_list) -> bool:
    width = block.get_submodule(group.prev).weight.numel()
    g = torch.Generator().manual_seed(1)
    s = torch.exp((torch.rand(width, generator=g) - 0.5) * 1.4)  # in [0.5, 2]
    trial = copy.deepcopy(block)
    fold_scales(trial, group, s.to(block.get_submodule(group.prev).weight.device))
    for inputs in inputs_list:
        ref, out = _run(block, *inputs), _run(trial, *inputs)
        if not torch.isfinite(out).all() or (out - ref).abs().max() > VERIFY_RTOL * ref.abs().max():
            return False
    return True


@torch.no_grad()
def discover_groups(model: nn.Module, blocks: Sequence[nn.Module], linears: Sequence[str],
                    where: str = "") -> Discovery:
    """Norm -> linear groups of block 0, each verified by exact folding (see
    the module doc). ``blocks`` / ``linears``: what extraction found."""
    hidden, args, kwargs = _block_inputs(model, blocks[0])
    # a float32 copy (half-precision rounding would hide nothing but blur the check)
    dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    block = copy.deepcopy(blocks[0]).to(device=hidden.device, dtype=dtype).eval()
    args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(hidden.shape, generator=g).to(hidden.device, dtype)
    inputs_list = [(hidden.to(dtype), args, kwargs), (noise * hidden.float().std().to(dtype), args, kwargs)]
    result = Discovery()
    groups = []
    for norm, readers in _candidates(block, linears, inputs_list[0]):
        ok = None
        for offset in _WEIGHT_OFFSETS:
            group = ScaleGroup(norm, "norm", readers, weight_offset=offset)
            if _folds_exactly(block, group, inputs_list):
                ok = group
                break
        if ok is None:
            why = "folding random scales changed the block's output (as x*w and as x*(1+w))"
            result.skipped.append((f"{norm} -> {', '.join(readers)}", why))
            logger.warning("%s: skipped the discovered scale group %s -> %s: %s", where or "discovery", norm,
                           ", ".join(readers), why)
        else:
            groups.append(ok)
    result.groups = tuple(groups)
    return result
