"""Module extraction: which linears a model has and how they relate (which
norm or linear feeds which projections), found from the declared
:class:`ArchSpec` of its model type (:mod:`.archs`), else by the generic
fallback (:mod:`.discover`).

Methods use the relations to fold per-channel scales (SmoothQuant, AWQ) into
the operation that produces a linear's input, so the float model stays exactly
equivalent before quantization. Declared relations win; a fallback model's
are discovered on first use and each verified by exact folding.

Mixture-of-experts models (an ArchSpec with ``moe``): extraction first
unfuses the fused 3-D expert parameters into one ``nn.Linear`` per expert
projection (:func:`.experts.unfuse`, the same function of the inputs), so
blocks can differ: each block's linears and groups are
:meth:`ModelSpec.linears_of` / :meth:`ModelSpec.groups_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from torch import nn

from ..log import logger
from ..nn import input_rotation
from ..nn.qlinear import QLinear
from ..nn.replace import is_quantizable
from .archs import ARCHITECTURES, SUPPORTED_MODEL_TYPES, ArchSpec, ScaleGroup, declared_variants
from .discover import Discovery, discover_groups, fallback_spec
from .experts import UnfusedExperts, unfuse

__all__ = ["ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "ArchSpec", "ModelSpec", "ScaleGroup", "extract"]


@dataclass
class ModelSpec:
    """What extraction found in one model."""

    arch: ArchSpec
    model_type: str
    blocks: list[nn.Module]
    block_linears: tuple[str, ...]
    extra_linears: list[str] = field(default_factory=list)  # outside blocks (lm_head, ...)
    # declared groups (GQA already accounted for); None: discovered on first use
    declared_groups: Optional[tuple[ScaleGroup, ...]] = None
    model: Optional[nn.Module] = field(default=None, repr=False)
    # MoE: per block, its linears, its own groups (beyond ``groups``) and its
    # expert modules' paths; None: every block has ``block_linears``
    per_block: Optional[list[tuple[str, ...]]] = None
    per_block_groups: Optional[list[tuple[ScaleGroup, ...]]] = None
    per_block_experts: Optional[list[tuple[str, ...]]] = None

    @property
    def declared(self) -> bool:
        return self.arch.declared

    @cached_property
    def discovery(self) -> Discovery:
        """The fallback's discovery on this model (runs one random batch once)."""
        return discover_groups(self.model, self.blocks, self.block_linears, where=self.model_type)

    @cached_property
    def groups(self) -> tuple[ScaleGroup, ...]:
        if self.declared_groups is not None:
            return self.declared_groups
        found = self.discovery.groups
        if found:
            logger.info("%s: discovered scale groups (verified by exact folding): %s", self.model_type,
                        "; ".join(g.describe() for g in found))
        else:
            logger.warning("%s: the generic fallback found no foldable scale group; SmoothQuant / AWQ run "
                           "without smoothing (AWQ: round-to-nearest with its clip search)", self.model_type)
        return found

    def linears_of(self, i: int) -> tuple[str, ...]:
        """Block ``i``'s quantizable linears (paths inside it)."""
        return self.block_linears if self.per_block is None else self.per_block[i]

    def groups_of(self, i: int) -> tuple[ScaleGroup, ...]:
        """Block ``i``'s scale groups: ``groups`` plus its MLP's (MoE)."""
        return self.groups + (() if self.per_block_groups is None else self.per_block_groups[i])

    def experts_of(self, i: int) -> tuple[str, ...]:
        """Block ``i``'s routed experts (paths inside it, e.g. ``mlp.experts.3``); () for a dense block."""
        return () if self.per_block_experts is None else self.per_block_experts[i]

    def linear_paths(self) -> list[str]:
        """Full paths of every quantizable linear inside the decoder blocks."""
        return [f"{self.arch.layers_path}.{i}.{name}" for i in range(len(self.blocks))
                for name in self.linears_of(i)]


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def _uses_gqa(model: nn.Module) -> bool:
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads is not None and kv != heads


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _moe_layout(arch: ArchSpec, blocks: list[nn.Module]):
    """Per block: linears, own groups, expert paths (MoE blocks hold ``moe.experts``)."""
    moe = arch.moe
    linears, groups, experts = [], [], []
    for block in blocks:
        if _has(block, moe.experts):
            mod = block.get_submodule(moe.experts)
            if not isinstance(mod, UnfusedExperts):
                raise ValueError(f"{moe.experts} is a {type(mod).__name__}, expected unfused experts")
            names = tuple(f"{moe.experts}.{e}" for e in range(len(mod)))
            linears.append(arch.linears + moe.shared + tuple(f"{n}.{p}" for n in names
                                                             for p in ("gate_proj", "up_proj", "down_proj")))
            own = moe.shared_groups
            if moe.expert_up_down:
                own += tuple(ScaleGroup(f"{n}.up_proj", "linear", (f"{n}.down_proj",)) for n in names)
            groups.append(own)
            experts.append(names)
        else:
            linears.append(arch.linears + moe.dense)
            groups.append(moe.dense_groups)
            experts.append(())
    return linears, groups, experts


def _declared(model: nn.Module, mtype: str, variants: list[ArchSpec]) -> tuple[ArchSpec, list[nn.Module]]:
    """The declared variant that fits ``model`` and its blocks."""
    path = variants[0].layers_path
    try:
        blocks = list(model.get_submodule(path))
    except AttributeError as err:
        raise ValueError(f"{mtype} model has no decoder blocks at '{path}' ({err})") from err
    if not blocks:
        raise ValueError(f"{mtype} model: expected decoder blocks at '{path}', got an empty list")
    arch = next((a for a in variants if all(_has(blocks[0], r) for r in a.requires)), None)
    if arch is None:
        layouts = "; ".join(f"{a.variant} (modules {', '.join(a.requires)})" for a in variants)
        raise ValueError(f"{mtype} model: expected its decoder block to have one of the declared layouts "
                         f"[{layouts}], got a block without those modules")
    if arch.moe is not None:
        n = unfuse(model, arch.layers_path, arch.moe)
        if n:
            logger.info("%s: unfused the experts of %d MoE blocks into one nn.Linear per expert projection",
                        mtype, n)
        per_block = _moe_layout(arch, blocks)[0]
    else:
        per_block = [arch.linears] * len(blocks)
    for i, block in enumerate(blocks):
        for name in per_block[i]:
            mod = block.get_submodule(name)
            if not (is_quantizable(mod) or isinstance(mod, QLinear)):
                raise ValueError(f"{arch.layers_path}.{i}.{name} is a {type(mod).__name__}, expected a linear")
    return arch, blocks


def _fallback(model: nn.Module, mtype: str) -> tuple[ArchSpec, list[nn.Module]]:
    try:
        arch = fallback_spec(model, mtype)
    except ValueError as err:
        raise ValueError(
            f"unknown model architecture {mtype!r}: llmeasyquant knows {', '.join(SUPPORTED_MODEL_TYPES)}, and "
            f"{err}. For other models, llmeasyquant.replace_linear(model, ...) swaps linears without "
            "calibration-based methods.") from err
    blocks = list(model.get_submodule(arch.layers_path))
    logger.info("%s is not a declared architecture: the generic fallback found %d blocks at %s with linears %s",
                mtype, len(blocks), arch.layers_path, ", ".join(arch.linears))
    return arch, blocks


def _without_rotated_folds(groups, block: nn.Module):
    """A linear -> linear group whose readers rotate their input online (a
    rotated model's down_proj) folds no longer: the rotation mixes the channels
    the scales would divide. Norm groups still fold (the norm precedes it all)."""
    def rotated(g):
        return g.prev_kind == "linear" and any(
            _has(block, n) and input_rotation.size_of(block.get_submodule(n)) is not None for n in g.linears)

    return tuple(g for g in groups if not rotated(g))


def extract(model: nn.Module) -> ModelSpec:
    """Find the decoder blocks, their quantizable linears and scale groups:
    from the declared spec of the model's type, else by the generic fallback.

    Raises ValueError when neither finds decoder blocks (plain
    ``llmeasyquant.replace_linear`` still works on any model).
    """
    mtype = _model_type(model)
    variants = declared_variants(mtype)
    layout = None
    if variants:
        arch, blocks = _declared(model, mtype, variants)
        groups = arch.groups + (() if _uses_gqa(model) else arch.mha_only_groups)
        if arch.moe is not None:
            layout = _moe_layout(arch, blocks)
    else:
        arch, blocks = _fallback(model, mtype)
        groups = None
    if groups is not None and blocks:
        groups = _without_rotated_folds(groups, blocks[0])
    per_block = layout[0] if layout else [arch.linears] * len(blocks)
    inside = {f"{arch.layers_path}.{i}.{n}" for i in range(len(blocks)) for n in per_block[i]}
    # gates declared float (Qwen2-MoE's shared_expert_gate) are no target
    kept = {f"{arch.layers_path}.{i}.{n}" for i in range(len(blocks)) for n in (arch.moe.float_linears
                                                                                if arch.moe else ())}
    extra = [n for n, m in model.named_modules() if is_quantizable(m) and n not in inside and n not in kept]
    spec = ModelSpec(arch=arch, model_type=mtype, blocks=blocks, block_linears=arch.linears, extra_linears=extra,
                     declared_groups=groups, model=model)
    if layout:
        spec.per_block, spec.per_block_groups, spec.per_block_experts = layout
    return spec
