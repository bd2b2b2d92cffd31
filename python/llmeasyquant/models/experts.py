"""Fused mixture-of-experts weights as one ``nn.Linear`` per expert projection.

transformers 5 stores a MoE layer's experts as 3-D parameters (Mixtral's
``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) and runs them with
``F.linear`` on each expert's routed tokens. Every llmeasyquant method works on
linears, so :func:`unfuse` replaces each fused experts module by
:class:`UnfusedExperts`: a ``ModuleList`` of :class:`ExpertMLP` (``gate_proj``,
``up_proj``, ``down_proj``, biases kept) whose forward is the same
computation, expert by expert, on the same routed tokens in the same order.
A forward pre-hook on ``experts.3.gate_proj`` therefore sees exactly the
tokens routed to expert 3: the methods calibrate each expert on its own
tokens, and QLinear replaces each expert linear (one weight-only / W8A8 call
per hit expert).

How a fused module's tensors map onto the linears is the ArchSpec's
``MoEFacts.layout`` (:mod:`.archs`):

* ``"gate_up"`` (Mixtral, Qwen2/3-MoE, DeepSeek-V3): ``gate_up_proj[e]`` is
  ``[gate; up]`` rows of a ``[2I, H]`` weight, ``down_proj[e]`` is ``[H, I]``;
  ``down(act(gate(x)) * up(x))``.
* ``"gpt_oss"``: transposed (``x @ gate_up_proj[e]``, ``[H, 2I]``), gate and
  up interleaved along the 2I columns (gate even, up odd), biases, and the
  clamped SwiGLU ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with
  ``g = clamp(gate, max=l)``.

The router stays a float module of the model (never a quantization target).
"""

from __future__ import annotations

import torch
from torch import nn

from .archs import MoEFacts, declared_variants

LAYOUTS = ("gate_up", "gpt_oss")


class ExpertMLP(nn.Module):
    """One expert: gate_proj / up_proj [I, H] and down_proj [H, I] linears."""

    def __init__(self, hidden: int, inter: int, bias: bool, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=bias, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE layer as :class:`ExpertMLP` modules; called like
    the fused module it replaces: ``(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``."""

    def __init__(self, experts: list[ExpertMLP], layout: str, act_fn=None, alpha: float = 0.0,
                 limit: float = 0.0, model_type: str = ""):
        super().__init__(experts)
        if layout not in LAYOUTS:
            raise ValueError(f"UnfusedExperts: expected a layout in {LAYOUTS}, got {layout!r}")
        # the activation (a parameter-free module) is kept out of the ModuleList's
        # children: those are exactly the experts, indexed 0 .. E-1
        object.__setattr__(self, "act_fn", act_fn)
        self.layout, self.alpha, self.limit = layout, alpha, limit
        self.model_type = model_type
        self.num_experts = len(experts)

    def _act(self, e: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "gpt_oss":
            gate = e.gate_proj(x).clamp(min=None, max=self.limit)
            up = e.up_proj(x).clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return self.act_fn(e.gate_proj(x)) * e.up_proj(x)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # the fused loop's order: experts ascending, tokens by (top-k slot, token)
        # (torch.where over expert_mask[e] = (top_k_index == e).T), so the
        # index_add_ accumulation is the same
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for idx in hit:
            if not 0 <= idx < self.num_experts:  # transformers' expert-parallel sentinel
                continue
            top_k_pos, token_idx = torch.where((top_k_index == idx).T)
            e = self[idx]
            y = e.down_proj(self._act(e, hidden_states[token_idx]))
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def moe_facts(model: nn.Module) -> MoEFacts | None:
    """The declared MoE facts of ``model``'s type (None: not a declared MoE)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    found = declared_variants(mtype) if isinstance(mtype, str) else []
    return found[0].moe if found else None


def _experts_paths(model: nn.Module, facts: MoEFacts, layers_path: str) -> list[str]:
    out = []
    for i, block in enumerate(model.get_submodule(layers_path)):
        try:
            block.get_submodule(facts.experts)
        except AttributeError:
            continue  # a dense block (DeepSeek-V3's first layers, Qwen2-MoE's mlp_only_layers)
        out.append(f"{layers_path}.{i}.{facts.experts}")
    return out


@torch.no_grad()
def unfused_from(fused: nn.Module, layout: str, model_type: str = "") -> UnfusedExperts:
    """The :class:`UnfusedExperts` computing what ``fused`` computes (weights copied)."""
    gu, down = fused.gate_up_proj, fused.down_proj
    E = gu.shape[0]
    kw = dict(dtype=gu.dtype, device=gu.device)
    if layout == "gate_up":
        _, two_i, H = gu.shape
        inter = two_i // 2
        experts = [ExpertMLP(H, inter, False, **kw) for _ in range(E)]
        for e, m in enumerate(experts):
            m.gate_proj.weight.copy_(gu[e, :inter])
            m.up_proj.weight.copy_(gu[e, inter:])
            m.down_proj.weight.copy_(down[e])
        return UnfusedExperts(experts, layout, act_fn=fused.act_fn, model_type=model_type)
    if layout == "gpt_oss":
        _, H, two_i = gu.shape
        inter = two_i // 2
        gb, db = fused.gate_up_proj_bias, fused.down_proj_bias
        experts = [ExpertMLP(H, inter, True, **kw) for _ in range(E)]
        for e, m in enumerate(experts):
            m.gate_proj.weight.copy_(gu[e, :, 0::2].T)
            m.gate_proj.bias.copy_(gb[e, 0::2])
            m.up_proj.weight.copy_(gu[e, :, 1::2].T)
            m.up_proj.bias.copy_(gb[e, 1::2])
            m.down_proj.weight.copy_(down[e].T)
            m.down_proj.bias.copy_(db[e])
        return UnfusedExperts(experts, layout, alpha=float(fused.alpha), limit=float(fused.limit),
                              model_type=model_type)
    raise ValueError(f"unfuse: expected a layout in {LAYOUTS}, got {layout!r}")


def is_unfused(model: nn.Module) -> bool:
    return any(isinstance(m, UnfusedExperts) for m in model.modules())


def unfuse(model: nn.Module, layers_path: str, facts: MoEFacts) -> int:
    """Replace every fused experts module of ``model`` (at ``facts.experts`` in
    each block that has one) by its :class:`UnfusedExperts`, in place.
    Returns how many were replaced (0: already unfused)."""
    mtype = model.config.model_type
    n = 0
    for path in _experts_paths(model, facts, layers_path):
        mod = model.get_submodule(path)
        if isinstance(mod, UnfusedExperts):
            continue
        if not hasattr(mod, "gate_up_proj") or not hasattr(mod, "down_proj"):
            raise ValueError(f"{mtype}: expected fused experts (gate_up_proj, down_proj) at {path}, got a "
                             f"{type(mod).__name__}")
        model.set_submodule(path, unfused_from(mod, facts.layout, mtype))
        n += 1
    return n


def unfused_names_in(names, model: nn.Module, layers_path: str, facts: MoEFacts) -> bool:
    """Whether tensor ``names`` (a checkpoint's) hold unfused experts
    (``...experts.0.gate_proj.weight``) for ``model``'s first MoE block."""
    paths = _experts_paths(model, facts, layers_path)
    if not paths:
        return False
    prefix = f"{paths[0]}.0."
    return any(k.startswith(prefix) for k in names)


def match_checkpoint(model: nn.Module, names) -> bool:
    """Unfuse ``model``'s experts when the checkpoint tensor ``names`` hold
    them unfused (a model quantized by llmeasyquant); True if it did."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    found = declared_variants(mtype) if isinstance(mtype, str) else []
    if not found or found[0].moe is None:
        return False
    arch = found[0]
    if not unfused_names_in(names, model, arch.layers_path, arch.moe):
        return False
    return unfuse(model, arch.layers_path, arch.moe) > 0
