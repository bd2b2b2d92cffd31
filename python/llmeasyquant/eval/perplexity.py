"""Perplexity on WikiText-2 with the standard protocol.

The whole raw test file is read as it is, tokenized once, and cut into
non-overlapping windows of ``seq_len`` tokens (the last partial window is
dropped, as in the GPTQ/AWQ/SmoothQuant evaluations). Perplexity is
exp(mean NLL) over every predicted token: ``seq_len - 1`` per window, or with
a ``stride`` < seq_len, only the tokens not already scored by the previous
window (each with the full left context of its window).

The same function measures a model with a quantized KV cache (SimQuant): each
window is one prefill forward with a fresh quantized cache, so attention sees
the quantized K/V (all of them when ``residual_length == 0``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..data import default_eval_file, read_text
from ..methods.simquant import make_cache


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens scored
    windows: int
    seq_len: int
    stride: int
    dtype: str
    source: str  # the text file scored, or "ids" when the caller tokenized it

    def protocol(self) -> str:
        return (f"{self.source}, {self.windows} windows x {self.seq_len} tokens, "
                f"stride {self.stride}, {self.tokens} predicted tokens, {self.dtype}")

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_file(tokenizer, path: str) -> torch.Tensor:
    return tokenizer(read_text(path), return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(model, tokenizer=None, *, ids: Optional[torch.Tensor] = None, path: Optional[str] = None,
               seq_len: int = 2048, stride: Optional[int] = None, max_windows: Optional[int] = None,
               progress: bool = True, kv=None) -> PerplexityResult:
    """Perplexity of ``model`` on a text file (default: WikiText-2 raw test).

    Pass ``ids`` (already tokenized, 1-D) to reuse one tokenization across models.
    ``kv``: None - through the model's SimQuant KV cache when it has one
    (``quantize(model, "simquant")`` attached it), else without a cache;
    a SimQuant/KV config - through a cache with that config; ``False`` - no
    quantized cache (the float baseline of the same model).
    """
    if ids is None:
        if tokenizer is None:
            raise ValueError("perplexity: pass a tokenizer or pre-tokenized ids")
        path = path or default_eval_file()
        ids = tokenize_file(tokenizer, path)
    if not (isinstance(seq_len, int) and seq_len >= 2):
        raise ValueError(f"perplexity: seq_len must be an integer >= 2 (tokens per window), got {seq_len!r}")
    if max_windows is not None and not (isinstance(max_windows, int) and max_windows >= 1):
        raise ValueError(f"perplexity: max_windows must be None (all windows) or an integer >= 1, got {max_windows!r}")
    kv = getattr(model, "llmeq_kv_config", None) if kv is None else (kv or None)
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    if kv is not None and stride != seq_len:
        raise ValueError(f"perplexity with a quantized KV cache uses non-overlapping windows (stride = seq_len = "
                         f"{seq_len}), got stride {stride}")
    starts = list(range(0, ids.numel() - seq_len + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    if not starts:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    total_nll, count = 0.0, 0
    prev_end = 0
    for s in tqdm(starts, desc="perplexity" if kv is None else "kv perplexity", disable=not progress):
        window = ids[s: s + seq_len].unsqueeze(0)
        if kv is None:
            logits = model(window, use_cache=False).logits.float()
        else:  # one prefill through a fresh quantized cache
            logits = model(window, cache=make_cache(model, kv), use_cache=True).logits.float()
        # predictions for tokens s+1 .. s+seq_len-1; score only those not scored before
        first_new = max(prev_end, s + 1) - s
        logp = torch.log_softmax(logits[0, first_new - 1: -1], dim=-1)
        target = window[0, first_new:]
        total_nll -= logp.gather(1, target.unsqueeze(1)).sum().item()
        count += target.numel()
        prev_end = s + seq_len
    nll = total_nll / count
    dtype = str(next(model.parameters()).dtype).replace("torch.", "") if any(True for _ in model.parameters()) else "?"
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(starts), seq_len=seq_len,
                            stride=stride, dtype=dtype, source=str(path) if path is not None else "ids")
