"""Tokens per second of a causal LM: prefill (one forward over a prompt) and
decode (greedy generation through the model's own cache, a quantized KV cache
included). Wall-clock medians on whatever device the model is on.

Decode runs, by default, the fastest loop that generates what greedy
``generate`` does:

* "fast": :mod:`.fast_decode`, one plain pass over the decoder stack per
  token for LLaMA-form models (LLaMA, Mistral, Qwen2/3, SmolLM), through the
  model's own projection modules, K/V buffers allocated once;
* "lean": :func:`greedy_decode`, a plain loop of ``model.forward`` calls (one
  token each, the cache ``generate`` would build, EOS suppressed as
  ``min_new_tokens`` does), without ``generate``'s per-token bookkeeping
  (stopping criteria, logits processors, kwargs updates: ~5-8 % of a decode
  token for the 135M default model on one CPU thread, docs/benchmarks.md);
* "generate": HF ``generate``, for models whose generation config asks for
  anything more (a repetition penalty, suppressed tokens, beams, ...;
  :func:`lean_decode_unsupported` says why)."""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from . import fast_decode

#: tokens of the prompt that decode is measured after (its prefill cancels out)
DECODE_PROMPT_TOKENS = 64


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_tokens: int
    decode_tokens: int
    threads: int
    device: str
    batch: int = 1
    # how decode ran: "fast" (fast_decode.greedy), "lean" (greedy_decode) or "generate" (HF generate)
    decode_loop: str = "lean"
    # greedy tokens of the timed decode, [batch, 1 + decode_tokens]: lets a caller check that a
    # faster decode path generates the same tokens
    generated: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("generated")
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, reps: int, device: torch.device, warmup: bool = True) -> float:
    if warmup:
        fn()  # warm-up (allocations, kernel selection)
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# GenerationConfig fields that make greedy ``generate`` do more than argmax
# over EOS-suppressed logits (logits processors, beams, chunked prefill);
# a model whose generation config sets any of them to a non-default value is
# decoded through ``generate``. The sampling warpers (temperature, top_k, ...)
# are off with do_sample=False; min_length only suppresses EOS, as
# min_new_tokens does already.
_GREEDY_CHANGING = ("bad_words_ids", "begin_suppress_tokens", "encoder_no_repeat_ngram_size",
                    "encoder_repetition_penalty", "exponential_decay_length_penalty", "forced_bos_token_id",
                    "forced_eos_token_id", "guidance_scale", "no_repeat_ngram_size", "num_beams",
                    "remove_invalid_values", "renormalize_logits", "repetition_penalty", "sequence_bias",
                    "suppress_tokens", "watermarking_config", "prefill_chunk_size", "num_assistant_tokens",
                    "prompt_lookup_num_tokens", "assistant_confidence_threshold")


def _forward_params(model) -> set:
    return set(inspect.signature(model.forward).parameters)


def lean_decode_unsupported(model) -> Optional[str]:
    """Why :func:`greedy_decode` would not generate what greedy ``generate``
    does for ``model`` (None when it does)."""
    from transformers import GenerationConfig

    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return "not a decoder-only Hugging Face model"
    params = _forward_params(model)
    if not ({"cache", "past_key_values"} & params) or "attention_mask" not in params:
        return f"{type(model).__name__}.forward takes no cache / attention_mask argument"
    gen = getattr(model, "generation_config", None) or GenerationConfig()
    if getattr(gen, "cache_implementation", None) not in (None, "dynamic"):
        return f"its generation config asks for cache_implementation={gen.cache_implementation!r}"
    base = GenerationConfig()
    changed = [k for k in _GREEDY_CHANGING if getattr(gen, k, None) != getattr(base, k, None)]
    if changed:
        return "its generation config sets " + ", ".join(f"{k}={getattr(gen, k)!r}" for k in changed)
    return None


def _new_cache(model):
    """The cache greedy ``generate`` builds: a DynamicCache, or the SimQuant
    cache when the model carries a KV-cache config (methods/simquant.py swaps
    it in the same way)."""
    from transformers import DynamicCache

    if getattr(model, "llmeq_kv_config", None) is not None:
        from ..methods.simquant import make_cache

        return make_cache(model)
    return DynamicCache(config=model.config)


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``[batch, prompt + new_tokens]``: what ``model.generate(prompt,
    do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
    attention_mask=ones)`` returns, by a plain loop of forwards (the prompt
    unpadded: every row as long). Raises ``ValueError`` for a model
    :func:`lean_decode_unsupported` names."""
    why = lean_decode_unsupported(model)
    if why is not None:
        raise ValueError(f"greedy_decode: {why}; use model.generate")
    if new_tokens < 1:
        raise ValueError(f"greedy_decode: new_tokens must be >= 1, got {new_tokens}")
    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    eos = fast_decode.eos_ids(model)
    B, L = prompt.shape
    mask = torch.ones(B, L + new_tokens, dtype=torch.long, device=prompt.device)
    kw = {cache_kw: _new_cache(model), "use_cache": True, **keep}
    out = model(input_ids=prompt, attention_mask=mask[:, :L], **kw)
    toks = [prompt]
    for i in range(new_tokens):
        # generate's greedy step: float32 logits of the last position, EOS
        # masked (min_new_tokens), first maximum
        logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        if eos:
            logits[:, eos] = -float("inf")
        nxt = logits.argmax(-1, keepdim=True)
        toks.append(nxt)
        if i + 1 < new_tokens:
            out = model(input_ids=nxt, attention_mask=mask[:, :L + i + 1], **kw)
    return torch.cat(toks, dim=1)


def _decode_loop(model, asked: str, total_tokens: int) -> str:
    """The loop ``throughput`` decodes ``model`` with: ``asked``, checked, or
    for "auto" the first of fast, lean, generate that generates what greedy
    ``generate`` does."""
    why_lean = lean_decode_unsupported(model)
    why_fast = why_lean or fast_decode.unsupported(model, total_tokens)
    if asked == "fast" and why_fast is not None:
        raise ValueError(f"throughput: decode_loop='fast' cannot decode this model: {why_fast}")
    if asked == "lean" and why_lean is not None:
        raise ValueError(f"throughput: decode_loop='lean' cannot decode this model: {why_lean}")
    if asked != "auto":
        return asked
    return "fast" if why_fast is None else "lean" if why_lean is None else "generate"


def _rows(ids: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """``batch`` different consecutive slices of ``n`` tokens of ``ids``, [batch, n]."""
    return ids[: n * batch].reshape(batch, n)


@torch.no_grad()
def throughput(model, ids: torch.Tensor, *, prefill_tokens: int = 512, decode_tokens: int = 32,
               reps: int = 3, batch: int = 1, warmup: bool = True, decode_loop: str = "auto") -> SpeedResult:
    """Prefill: median time of one forward over ``prefill_tokens`` tokens of
    ``ids`` per sequence (no cache; logits of the last position only where the
    forward takes ``logits_to_keep``, as a generation needs and llama.cpp
    computes). Decode: ``decode_tokens`` / (time of greedy generation of 1 +
    decode_tokens new tokens - time of 1 new token) after a 64-token prompt, so
    the prompt's prefill cancels out. ``batch`` sequences (different slices of
    ``ids``) run together; tokens/s count all of them. ``warmup=False`` skips
    the untimed first call of each measurement (for a caller that repeats
    rounds on a model already warm). ``decode_loop``: "fast"
    (:func:`.fast_decode.greedy`), "lean" (:func:`greedy_decode`), "generate"
    (HF ``generate``) or "auto" (the first of those the model allows)."""
    if decode_loop not in ("auto", "fast", "lean", "generate"):
        raise ValueError(f"throughput: decode_loop must be 'auto', 'fast', 'lean' or 'generate', got {decode_loop!r}")
    need = batch * max(prefill_tokens, DECODE_PROMPT_TOKENS)
    if batch < 1:
        raise ValueError(f"throughput: batch must be >= 1, got {batch}")
    if ids.numel() < need:
        raise ValueError(f"throughput: need at least {need} token ids (batch {batch} x "
                         f"{max(prefill_tokens, DECODE_PROMPT_TOKENS)}), got {ids.numel()}")
    if prefill_tokens < 1 or decode_tokens < 1:
        raise ValueError(f"throughput: prefill_tokens and decode_tokens must be >= 1, got "
                         f"{prefill_tokens}, {decode_tokens}")
    device = next(model.parameters()).device
    ids = ids.reshape(-1)
    prompt = _rows(ids, prefill_tokens, batch).to(device)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    t_prefill = _median_s(lambda: model(prompt, use_cache=False, **keep), reps, device, warmup)
    short = _rows(ids, DECODE_PROMPT_TOKENS, batch).to(device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(short),
              pad_token_id=getattr(model.config, "eos_token_id", None) or 0)
    out = []
    loop = _decode_loop(model, decode_loop, DECODE_PROMPT_TOKENS + 1 + decode_tokens)

    def gen(n):
        def run():
            if loop == "fast":
                out[:] = [fast_decode.greedy(model, short, n)]
            elif loop == "lean":
                out[:] = [greedy_decode(model, short, n)]
            else:
                out[:] = [model.generate(short, max_new_tokens=n, min_new_tokens=n, **kw)]
        return run

    t1 = _median_s(gen(1), reps, device, warmup)
    tn = _median_s(gen(1 + decode_tokens), reps, device, warmup)
    return SpeedResult(prefill_tokens_per_s=batch * prefill_tokens / t_prefill,
                       decode_tokens_per_s=batch * decode_tokens / max(tn - t1, 1e-9),
                       prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                       threads=torch.get_num_threads(), device=str(device), batch=batch, decode_loop=loop,
                       generated=out[0][:, short.shape[1]:].tolist())
