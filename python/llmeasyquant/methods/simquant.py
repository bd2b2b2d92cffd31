"""SimQuant: KV-cache quantization (after KVQuant / KIVI). Weights stay float.

``apply`` attaches the KV-cache config to the model (``model.llmeq_kv_config``)
and hooks the model's cache preparation for ``generate``: whenever ``generate``
would create its default ``DynamicCache`` (no cache passed, ``use_cache`` on, no
``cache_implementation`` asked for), it gets a fresh ``SimQuantCache`` instead. A
cache passed explicitly (``generate(..., cache=...)``) is used as is.

``make_cache(model)`` gives a cache for explicit use, e.g. a perplexity window:
``model(window, cache=make_cache(model), use_cache=True)`` (``past_key_values=``
is the deprecated name of the same argument). ``kv_perplexity`` does exactly that
over WikiText-2 windows. See ``llmeasyquant.kvcache`` for what attention sees.
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch
from torch import nn

from ..kvcache import SimQuantCache, check_kv_config
from .base import QuantConfig, SimQuantConfig  # noqa: F401  (re-exported)

# decoder-only models whose attention stores K/V through `Cache.update(k, v, layer_idx)`
# with K/V shaped [batch, kv_heads, tokens, head_dim] in this transformers version
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def check_supported(model: nn.Module) -> None:
    """Raise ValueError unless ``model`` is a decoder-only architecture whose
    attention uses the transformers ``Cache`` API the way SimQuant expects."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"SimQuant KV-cache quantization supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"got {mt!r}")
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
    """The model's rotary embedding module when SimQuant can invert it (rotate-half
    RoPE over the whole head_dim with position-independent frequencies), else None
    (keys are then quantized after RoPE)."""
    emb = getattr(getattr(model, "model", None), "rotary_emb", None)
    if emb is None or getattr(model.config, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        return None
    rope_type = str(getattr(emb, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type:  # frequencies depend on the sequence length
        return None
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if getattr(emb, "inv_freq", None) is None or 2 * emb.inv_freq.numel() != head_dim:
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


@torch.no_grad()
def apply(model: nn.Module, spec, config, calib, progress: bool = True, shard=None) -> None:
    """Attach the KV-cache config and make ``generate`` use a SimQuant cache by
    default. No weights change; ``spec``, ``calib`` and ``shard`` are unused
    (every rank does the same, cheap, setup)."""
    check_supported(model)
    check_kv_config(config)
    model.llmeq_kv_config = config
    install_generate_hook(model)


@torch.no_grad()
def kv_perplexity(model: nn.Module, ids: torch.Tensor, config=None, *, seq_len: int = 2048,
                  max_windows: Optional[int] = None, progress: bool = False):
    """WikiText-2-style perplexity (``eval.perplexity`` protocol: non-overlapping
    windows, stride = seq_len) with a fresh SimQuant cache per window: one prefill
    forward with ``use_cache=True``, so attention sees the quantized KV (all of it
    when ``residual_length == 0``). ``config=False``: float baseline through the
    same code path (default DynamicCache)."""
    from tqdm.auto import tqdm

    from ..eval.perplexity import PerplexityResult

    starts = list(range(0, ids.numel() - seq_len + 1, seq_len))[:max_windows]
    if not starts:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    total, count = 0.0, 0
    for s in tqdm(starts, desc="kv perplexity", disable=not progress):
        window = ids[s: s + seq_len].unsqueeze(0)
        cache = None if config is False else make_cache(model, config)
        logits = model(window, cache=cache, use_cache=True).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        total -= logp.gather(1, window[0, 1:].unsqueeze(1)).sum().item()
        count += seq_len - 1
    nll = total / count
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(starts), seq_len=seq_len,
                            stride=seq_len, dtype=dtype, source="ids")
