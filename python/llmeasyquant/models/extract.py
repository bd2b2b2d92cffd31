"""Module extraction: which linears a Hugging Face model has, by architecture,
and how they relate (which norm or linear feeds which projections).

Methods use the relations to fold per-channel scales (SmoothQuant, AWQ) into
the operation that produces a linear's input, so the float model stays exactly
equivalent before quantization. Relations are declared per architecture, not
guessed from module names at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..nn.qlinear import QLinear
from ..nn.replace import is_quantizable


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the op that produces that input.

    ``prev`` is a path (relative to the block) of a norm (``prev_kind="norm"``,
    its weight/bias are divided by the scales) or of a linear
    (``prev_kind="linear"``, its output rows are divided by the scales).
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    layers_path: str  # path of the ModuleList of decoder blocks
    linears: tuple[str, ...]  # quantizable linears inside one block, in forward order
    groups: tuple[ScaleGroup, ...]
    # groups valid only without grouped-query attention (v_proj -> o_proj)
    mha_only_groups: tuple[ScaleGroup, ...] = ()
    # modules between the last block and the LM head, in order (absent ones skipped)
    final: tuple[str, ...] = ()


_LLAMA_LIKE = ArchSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    groups=(
        ScaleGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
        # down_proj reads act(gate) * up: scaling up's output rows is exact
        ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",)),
    ),
    mha_only_groups=(ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",)),),
    final=("model.norm",),
)

_OPT = ArchSpec(
    model_types=("opt",),
    layers_path="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    groups=(
        ScaleGroup("self_attn_layer_norm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("final_layer_norm", "norm", ("fc1",)),
    ),
    mha_only_groups=(ScaleGroup("self_attn.v_proj", "linear", ("self_attn.out_proj",)),),
    final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
)

_GPT2 = ArchSpec(
    model_types=("gpt2",),
    layers_path="transformer.h",
    linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    groups=(
        ScaleGroup("ln_1", "norm", ("attn.c_attn",)),
        ScaleGroup("ln_2", "norm", ("mlp.c_fc",)),
    ),
    final=("transformer.ln_f",),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (_LLAMA_LIKE, _OPT, _GPT2)
SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)


@dataclass
class ModelSpec:
    """What extraction found in one model."""

    arch: ArchSpec
    model_type: str
    blocks: list[nn.Module]
    groups: tuple[ScaleGroup, ...]
    block_linears: tuple[str, ...]
    extra_linears: list[str] = field(default_factory=list)  # outside blocks (lm_head, ...)

    def linear_paths(self) -> list[str]:
        """Full paths of every quantizable linear inside the decoder blocks."""
        return [f"{self.arch.layers_path}.{i}.{name}" for i in range(len(self.blocks))
                for name in self.block_linears]


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def _uses_gqa(model: nn.Module) -> bool:
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads is not None and kv != heads


def extract(model: nn.Module) -> ModelSpec:
    """Find the decoder blocks, their quantizable linears and scale groups.

    Raises ValueError for an architecture we have no spec for (plain
    ``llmeasyquant.replace_linear`` still works on any model).
    """
    mtype = _model_type(model)
    arch = next((a for a in ARCHITECTURES if mtype in a.model_types), None)
    if arch is None:
        raise ValueError(
            f"unknown model architecture {mtype!r}: llmeasyquant knows {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "For other models, llmeasyquant.replace_linear(model, ...) swaps linears without "
            "calibration-based methods.")
    try:
        blocks = list(model.get_submodule(arch.layers_path))
    except AttributeError as err:
        raise ValueError(f"{mtype} model has no decoder blocks at '{arch.layers_path}' ({err})") from err
    groups = arch.groups + (() if _uses_gqa(model) else arch.mha_only_groups)
    for i, block in enumerate(blocks):
        for name in arch.linears:
            mod = block.get_submodule(name)
            if not (is_quantizable(mod) or isinstance(mod, QLinear)):
                raise ValueError(f"{arch.layers_path}.{i}.{name} is a {type(mod).__name__}, expected a linear")
    inside = set(ModelSpec(arch, mtype, blocks, groups, arch.linears).linear_paths())
    extra = [n for n, m in model.named_modules() if is_quantizable(m) and n not in inside]
    return ModelSpec(arch=arch, model_type=mtype, blocks=blocks, groups=groups, block_linears=arch.linears,
                     extra_linears=extra)
