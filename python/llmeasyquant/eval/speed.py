"""Tokens per second of a causal LM: prefill (one forward over a prompt) and
decode (greedy generation through the model's own cache, a quantized KV cache
included). Wall-clock medians on whatever device the model is on."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

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


def _rows(ids: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """``batch`` different consecutive slices of ``n`` tokens of ``ids``, [batch, n]."""
    return ids[: n * batch].reshape(batch, n)


@torch.no_grad()
def throughput(model, ids: torch.Tensor, *, prefill_tokens: int = 512, decode_tokens: int = 32,
               reps: int = 3, batch: int = 1, warmup: bool = True) -> SpeedResult:
    """Prefill: median time of one forward over ``prefill_tokens`` tokens of
    ``ids`` per sequence (no cache). Decode: ``decode_tokens`` / (time of greedy
    generation of 1 + decode_tokens new tokens - time of 1 new token) after a
    64-token prompt, so the prompt's prefill cancels out. ``batch`` sequences
    (different slices of ``ids``) run together; tokens/s count all of them.
    ``warmup=False`` skips the untimed first call of each measurement (for a
    caller that repeats rounds on a model already warm)."""
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
    t_prefill = _median_s(lambda: model(prompt, use_cache=False), reps, device, warmup)
    short = _rows(ids, DECODE_PROMPT_TOKENS, batch).to(device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(short),
              pad_token_id=getattr(model.config, "eos_token_id", None) or 0)
    out = []

    def gen(n):
        def run():
            out[:] = [model.generate(short, max_new_tokens=n, min_new_tokens=n, **kw)]
        return run

    t1 = _median_s(gen(1), reps, device, warmup)
    tn = _median_s(gen(1 + decode_tokens), reps, device, warmup)
    return SpeedResult(prefill_tokens_per_s=batch * prefill_tokens / t_prefill,
                       decode_tokens_per_s=batch * decode_tokens / max(tn - t1, 1e-9),
                       prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                       threads=torch.get_num_threads(), device=str(device), batch=batch,
                       generated=out[0][:, short.shape[1]:].tolist())
