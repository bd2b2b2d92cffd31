"""Tokens per second of a causal LM: prefill (one forward over a prompt) and
decode (greedy generation through the model's own cache, a quantized KV cache
included). Wall-clock medians on whatever device the model is on."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_tokens: int
    decode_tokens: int
    threads: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, kernel selection)
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def throughput(model, ids: torch.Tensor, *, prefill_tokens: int = 512, decode_tokens: int = 32,
               reps: int = 3) -> SpeedResult:
    """Prefill: median time of one forward over ``prefill_tokens`` tokens of
    ``ids`` (batch 1, no cache). Decode: ``decode_tokens`` / (time of greedy
    generation of 1 + decode_tokens new tokens - time of 1 new token) after a
    64-token prompt, so the prompt's prefill cancels out."""
    if ids.numel() < max(prefill_tokens, 64):
        raise ValueError(f"throughput: need at least {max(prefill_tokens, 64)} token ids, got {ids.numel()}")
    if prefill_tokens < 1 or decode_tokens < 1:
        raise ValueError(f"throughput: prefill_tokens and decode_tokens must be >= 1, got "
                         f"{prefill_tokens}, {decode_tokens}")
    device = next(model.parameters()).device
    prompt = ids[:prefill_tokens].unsqueeze(0).to(device)
    t_prefill = _median_s(lambda: model(prompt, use_cache=False), reps, device)
    short = ids[:64].unsqueeze(0).to(device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(short),
              pad_token_id=getattr(model.config, "eos_token_id", None) or 0)

    def gen(n):
        return lambda: model.generate(short, max_new_tokens=n, min_new_tokens=n, **kw)

    t1 = _median_s(gen(1), reps, device)
    tn = _median_s(gen(1 + decode_tokens), reps, device)
    return SpeedResult(prefill_tokens_per_s=prefill_tokens / t_prefill,
                       decode_tokens_per_s=decode_tokens / max(tn - t1, 1e-9),
                       prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                       threads=torch.get_num_threads(), device=str(device))
