"""Calibration: turning text into token batches, per-channel activation
statistics, and whole-model passes with observers. The block-by-block driver
that calibration-based methods run through is :mod:`llmeasyquant.pipeline`.

Text defaults to WikiText-2 *validation* (``wiki.valid.tokens``); evaluation
uses the test split, so calibration never sees evaluation text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .data import default_calib_file, read_text
from .log import logger


def calibration_batches(tokenizer, source: str | Sequence[str] | None = None, *, n_samples: int = 32,
                        seq_len: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` random windows of ``seq_len`` tokens, each ``[1, seq_len]``.

    ``source``: a text file path (default: WikiText-2 validation) or a list of
    strings (joined with blank lines).
    """
    if n_samples <= 0 or seq_len <= 1:
        raise ValueError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    if source is None or isinstance(source, str):
        text = read_text(source or default_calib_file())
    else:
        text = "\n\n".join(source)
    if not text.strip():
        raise ValueError("calibration set is empty: the text has no content")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        # short text: one window of what there is
        return [ids.unsqueeze(0)]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    logger.info("calibration: %d windows x %d tokens drawn from %d tokens of %s", n_samples, seq_len, ids.numel(),
                source if isinstance(source, str) else ("WikiText-2 validation" if source is None else "given text"))
    return [ids[s: s + seq_len].unsqueeze(0) for s in starts.tolist()]


# calib= value (and `quantize --calib generated`): calibrate on text the float
# model writes itself instead of a file.
GENERATED = "generated"


@torch.no_grad()
def generated_batches(model: nn.Module, tokenizer, *, n_samples: int = 32, seq_len: int = 512, seed: int = 0,
                      batch_size: int = 16, progress: bool = True) -> list[torch.Tensor]:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model``
    itself, each ``[1, seq_len]`` (data-free calibration, as in LLM-QAT).

    Each sequence starts from one token drawn uniformly from the vocabulary
    (special tokens left out) and continues by sampling the model's own
    next-token distribution (temperature 1, no top-k / top-p, EOS not a stop),
    so it covers what the model writes rather than one corpus. Why: GPTQ fits
    its calibration text; calibrated on WikiText it gains over RTN on
    WikiText but much less on other kinds of text (docs/results.md, "Out of
    domain"), and on the model's own text it gives up some of the first for
    more of the second. Seeded: the same arguments (``batch_size`` included:
    the sequences of one batch share a random stream) give the same text;
    torch's global random state is left as it was. Run it on the float
    model, before quantizing."""
    if n_samples <= 0 or seq_len <= 1 or batch_size <= 0:
        raise ValueError(f"generated calibration needs n_samples >= 1, seq_len >= 2 and batch_size >= 1, got "
                         f"{n_samples}, {seq_len}, {batch_size}")
    from transformers import GenerationConfig

    vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[t for t in tokenizer.all_special_ids if t < vocab]] = False
    candidates = allowed.nonzero().flatten()
    if candidates.numel() == 0:
        raise ValueError("generated calibration: the tokenizer has no ordinary (non-special) token to start from")
    g = torch.Generator().manual_seed(seed)
    first = candidates[torch.randint(0, candidates.numel(), (n_samples,), generator=g)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                           min_new_tokens=seq_len - 1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in tqdm(range(0, n_samples, batch_size), desc="calibration (model-generated text)",
                          disable=not progress):
                ids = first[i: i + batch_size].unsqueeze(1).to(device)
                seqs = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
                out += [row.unsqueeze(0).cpu() for row in seqs]
    finally:
        model.train(was_training)
    logger.info("calibration: %d sequences x %d tokens generated by the model (seed %d)", n_samples, seq_len, seed)
    return out


def batches_from(source, tokenizer, model: nn.Module, *, n_samples: int, seq_len: int,
                 seed: int = 0) -> list[torch.Tensor]:
    """The one place a calibration source becomes token batches: ``"generated"``
    samples ``model`` (:func:`generated_batches`), anything else is text
    (:func:`calibration_batches`: a file, a list of strings, None = WikiText-2)."""
    if isinstance(source, str) and source == GENERATED:
        if model is None:
            raise ValueError("calib='generated' needs the model to sample from")
        return generated_batches(model, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    return calibration_batches(tokenizer, source, n_samples=n_samples, seq_len=seq_len, seed=seed)


@dataclass
class ChannelStats:
    """Running per-input-channel statistics of one linear's activations."""

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    samples: Optional[torch.Tensor] = None  # [T, K] token rows kept for searches
    keep_tokens: int = 0

    @classmethod
    def empty(cls, K: int, device=None, keep_tokens: int = 0) -> "ChannelStats":
        return cls(*ops.new_channel_stats(K, device), keep_tokens=keep_tokens)

    def update(self, x: torch.Tensor) -> None:
        ops.channel_stats_(x.detach(), self.absmax, self.min, self.max)
        if self.keep_tokens:
            # an evenly spaced subset of each batch's tokens, up to keep_tokens in all
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            have = 0 if self.samples is None else self.samples.shape[0]
            take = min(self.keep_tokens - have, rows.shape[0])
            if take > 0:
                idx = torch.linspace(0, rows.shape[0] - 1, take).round().long()
                picked = rows[idx]
                self.samples = picked if self.samples is None else torch.cat([self.samples, picked])

    @property
    def seen(self) -> bool:
        """Whether any row was observed (an expert no token was routed to: False)."""
        return bool((self.min <= self.max).any())

    def divide_(self, s: torch.Tensor) -> None:
        """The statistics of X / s (s > 0 per channel)."""
        self.absmax.div_(s)
        self.min.div_(s)
        self.max.div_(s)
        if self.samples is not None:
            self.samples = self.samples / s


def _in_features(module: nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]  # Conv1D: [in, out]


@torch.no_grad()
def observe_model(model: nn.Module, paths: Iterable[str], batches: Sequence[torch.Tensor],
                  on_input: Callable[[str, torch.Tensor], None], desc: str = "calibrating",
                  progress: bool = True) -> None:
    """Run the model over ``batches``; ``on_input(path, x)`` sees the input
    ``x`` of every module at ``paths`` (as the module received it)."""
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, args, p=p: on_input(p, args[0].detach()))
             for p in paths]
    try:
        for ids in tqdm(batches, desc=desc, disable=not progress):
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def collect_input_stats(model: nn.Module, paths: Iterable[str], batches: Sequence[torch.Tensor],
                        progress: bool = True, keep_tokens: int = 0) -> dict[str, ChannelStats]:
    """Per-channel absmax/min/max of the inputs of the modules at ``paths``
    (and up to ``keep_tokens`` sample rows of each input, for searches)."""
    paths = list(paths)
    stats = {p: ChannelStats.empty(_in_features(model.get_submodule(p)), keep_tokens=keep_tokens) for p in paths}
    observe_model(model, paths, batches, lambda p, x: stats[p].update(x.float()),
                  "calibrating (activation statistics)", progress)
    return stats
