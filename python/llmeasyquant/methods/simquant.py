"""SimQuant: KV-cache quantization (after KVQuant / KIVI). Weights stay float.

``apply`` attaches the KV-cache config to the model (``model.llmeq_kv_config``)
and hooks the model's cache preparation for ``generate``: whenever ``generate``
would create its default ``DynamicCache`` (no cache passed, ``use_cache`` on, no
``cache_implementation`` asked for), it gets a fresh ``SimQuantCache`` instead. A
cache passed explicitly (``generate(..., cache=...)``) is used as is.

``make_cache(model)`` gives a cache for explicit use, e.g. a perplexity window:
``model(window, cache=make_cache(model), use_cache=True)`` (``past_key_values=``
is the deprecated name of the same argument). ``llmeasyquant.eval.perplexity`` does exactly that
over WikiText-2 windows. See ``llmeasyquant.kvcache`` for what attention sees.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import hadamard
from ..kvcache import KVCacheConfig, SimQuantCache, check_kv_config
from ..models.archs import SUPPORTED_MODEL_TYPES as ARCH_TYPES, head_dim, kv_facts
from .base import QuantConfig, register_method


@dataclass
class SimQuantConfig(QuantConfig, KVCacheConfig):
    """KV-cache quantization (:class:`llmeasyquant.kvcache.KVCacheConfig` says
    how); the weights stay float (the inherited ``w_*``/``act`` fields are unused)."""

    method: ClassVar[str] = "simquant"

    def describe(self) -> str:
        s = f"simquant KV K{self.k_bits} V{self.v_bits} chunk{self.chunk_size} res{self.residual_length}"
        if self.v_group_size != -1:
            s += f" vg{self.v_group_size}"
        if self.outlier_fraction:
            s += f" outliers {100 * self.outlier_fraction:g}%"
        if self.sink_tokens:
            s += f" sink{self.sink_tokens}"
        s += "" if self.pre_rope else " post-rope"
        s += " hadamard-" + ("kv" if self.k_hadamard and self.v_hadamard else "k" if self.k_hadamard else "v") \
            if self.k_hadamard or self.v_hadamard else ""
        return s


# decoder-only model types whose attention SimQuant can hook (declared in models/archs.py)
SUPPORTED_MODEL_TYPES = tuple(t for t in ARCH_TYPES if kv_facts(t).cache_api)
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def check_supported(model: nn.Module) -> None:
    """Raise ValueError unless ``model`` is a decoder-only architecture whose
    attention uses the transformers ``Cache`` API the way SimQuant expects."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    facts = kv_facts(mt) if isinstance(mt, str) else None
    if facts is None:
        raise ValueError(f"SimQuant KV-cache quantization supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"got {mt!r} (SimQuant needs a declared architecture: the generic fallback cannot tell "
                         "how an unknown attention stores its K/V)")
    if not facts.cache_api:
        raise ValueError(f"SimQuant KV-cache quantization supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"got {mt!r}, whose attention it cannot hook: {facts.unsupported}")
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"SimQuant supports decoder-only models without cross-attention ({mt} has it)")
    text = cfg.get_text_config(decoder=True)
    bad = set(getattr(text, "layer_types", None) or []) - _ATTENTION_LAYER_TYPES
    if bad:
        raise ValueError(f"SimQuant supports full/sliding attention layers only; {mt} has {sorted(bad)}")


def make_cache(model: nn.Module, config=None) -> SimQuantCache:
    """A fresh SimQuant cache for ``model`` (config: argument, else the one
    ``apply`` attached, else ``SimQuantConfig()``)."""
    check_supported(model)
    config = config or getattr(model, "llmeq_kv_config", None) or SimQuantConfig()
    return SimQuantCache(config, model_config=model.config, rotary_emb=rotary_embedding(model))


def rotary_embedding(model: nn.Module):
    """The model's rotary embedding module when SimQuant can invert it (the
    architecture declares one rotate-half RoPE for all layers, it spans the
    whole head_dim and its frequencies do not depend on the position), else
    None (keys are then quantized after RoPE)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    facts = kv_facts(mt) if isinstance(mt, str) else None
    if facts is None or facts.rotary_path is None or (facts.rope_off_flag and getattr(cfg, facts.rope_off_flag, False)):
        return None
    try:
        emb = model.get_submodule(facts.rotary_path)
    except AttributeError:
        return None
    rope_type = str(getattr(emb, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type:  # frequencies depend on the sequence length
        return None
    if getattr(emb, "inv_freq", None) is None or 2 * emb.inv_freq.numel() != head_dim(model.config):
        return None  # partial rotary
    return emb


def _prepare_cache_with_simquant(self, generation_config, model_kwargs, *args, **kwargs):
    """Instance override of GenerationMixin._prepare_cache_for_generation: run the
    original, then swap the default DynamicCache it created for a SimQuantCache."""
    from transformers.cache_utils import DynamicCache

    had_cache = model_kwargs.get("cache") is not None
    out = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    cfg = getattr(self, "llmeq_kv_config", None)
    created = model_kwargs.get("cache")
    if (cfg is not None and not had_cache and type(created) is DynamicCache
            and generation_config.cache_implementation in (None, "dynamic")):
        model_kwargs["cache"] = make_cache(self, cfg)
    return out


def install_generate_hook(model: nn.Module) -> None:
    if not hasattr(type(model), "_prepare_cache_for_generation"):
        raise ValueError(f"{type(model).__name__} has no _prepare_cache_for_generation; this transformers version is "
                         "not supported by SimQuant's generate hook (pass cache=make_cache(model) to generate)")
    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_with_simquant, model)


@register_method(SimQuantConfig, calibrates=False)
@torch.no_grad()
def apply(model: nn.Module, spec, config, calib, *, progress: bool = True, shard=None, device=None) -> None:
    """Attach the KV-cache config and make ``generate`` use a SimQuant cache by
    default. No weights change; ``spec``, ``calib``, ``shard`` and ``device``
    are unused (every rank does the same, cheap, setup)."""
    check_supported(model)
    check_kv_config(config)
    if (config.k_hadamard or config.v_hadamard) and not hadamard.supported(hd := head_dim(model.config)):
        raise ValueError(f"simquant: k_hadamard / v_hadamard need a Hadamard matrix of order head_dim = {hd}; "
                         "none is built here (orders m * 2**k, m = 1, 2 or a Paley order)")
    model.llmeq_kv_config = config
    install_generate_hook(model)
