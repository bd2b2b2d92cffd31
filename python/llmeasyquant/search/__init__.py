"""Per-layer mixed-precision bit-width search (paper Theorem B.19):

    choose b_l in the candidates for every quantizable linear l to minimise
    L_task(b) + lam * sum_l Phi(b_l)   or   L_task(b) s.t. sum_l bytes_l(b_l) <= budget

``Phi`` and the budget count the bytes each layer really holds (packed weights,
scales, zero-points, bias). ``L_task`` is the next-token loss on calibration
text (WikiText-2 validation by default).

Pipeline: candidates (every layer quantized once at every bit width by the
base quantizer, :mod:`.candidates`) -> cached per-layer sensitivities (loss
with only that layer quantized, :mod:`.probe`) -> a strategy
(:mod:`.strategies`: ``entropy``, ``grid``, ``greedy``) -> the assignment,
applied to the model as QLinear layers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import batches_from, observe_model
from ..log import logger
from ..methods._common import swap, target_paths
from ..models.extract import extract
from ..models.rotate import ensure_rotated
from .candidates import BASES, Candidates, build_candidates, collect_hessians
from .probe import LossProbe
from .strategies import MIB, Objective, allocate, check_budget, default_groups, distortion, entropy, grid, greedy

STRATEGIES = ("entropy", "grid", "greedy")


@dataclass
class SearchResult:
    strategy: str
    base: str
    bits: tuple[int, ...]
    group_size: int
    scale_dtype: str
    assignment: dict[str, int]
    bytes: int
    bits_per_weight: float
    fp16_reduction: float  # fp16 bytes of the same layers / bytes held
    float_loss: float
    loss: float  # measured calibration loss of the assignment
    objective: float
    evals: int
    seconds: float
    history: list = field(default_factory=list)
    stopped: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"] = list(self.bits)
        return d

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for b in self.assignment.values():
            out[b] = out.get(b, 0) + 1
        return dict(sorted(out.items()))


@torch.no_grad()
def channel_energy(model: nn.Module, paths: Sequence[str], batches) -> dict[str, torch.Tensor]:
    """E[x_j^2] of every layer's input channels over the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(p: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        sums[p] = sums.get(p, 0) + x.pow(2).sum(0)
        counts[p] = counts.get(p, 0) + x.shape[0]

    observe_model(model, paths, batches, add, "search: channel energies", progress=False)
    return {p: sums[p] / counts[p] for p in paths}


class Searcher:
    """Holds what every budget of one model shares: candidates, the loss probe,
    sensitivities (computed once, on demand), channel energies."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor], *, bits=(2, 3, 4, 8), group_size: int = 64,
                 base: str = "rtn", exclude=("lm_head",), probe_batches: Optional[list[torch.Tensor]] = None,
                 sens_batches: int = 1, sens_tokens: int = 256, scale_dtype: str = "float16", progress: bool = True,
                 rotate: Optional[str] = None, rotate_seed: int = 0):
        """``rotate="hadamard"`` rotates the float model first (as
        ``QuantConfig.rotate`` does; every candidate then quantizes rotated
        weights). ``batches`` calibrate the candidates (GPTQ Hessians); ``probe_batches``
        (default: ``batches``) measure the loss of assignments. Give held-out
        probe batches when the base quantizer fits its calibration data (GPTQ):
        measured on its own calibration tokens a GPTQ layer looks better than it
        is, most of all at 2-3 bits, and the search would buy that illusion."""
        if base not in BASES:
            raise ValueError(f"unknown base quantizer {base!r}; choose from {', '.join(BASES)}")
        bits = tuple(sorted(set(int(b) for b in bits)))
        if len(bits) < 2:
            raise ValueError(f"a search needs at least two candidate bit widths, got {bits}")
        self.model, self.batches, self.progress = model, batches, progress
        self.rotate, self.rotate_seed = rotate, rotate_seed
        ensure_rotated(model, rotate, seed=rotate_seed, who="search")
        self.spec = extract(model)
        self.paths = target_paths(model, self.spec, exclude)
        if not self.paths:
            raise ValueError("no quantizable linear layers to search over")
        self.base, self.group_size, self.scale_dtype = base, group_size, scale_dtype
        t0 = time.perf_counter()
        self.cands = build_candidates(model, self.spec, self.paths, bits, group_size, base, batches, progress, scale_dtype)
        probe_batches = probe_batches or batches
        self.probe = LossProbe(model, self.spec, probe_batches)
        self.sens_probe = LossProbe(model, self.spec, [b[:, :sens_tokens] for b in probe_batches[:sens_batches]])
        self.setup_seconds = time.perf_counter() - t0
        logger.info("search: %d layers x %d candidates (%s) built and loss probe ready in %.1f s; float calibration "
                    "loss %.4f", len(self.paths), len(bits), base, self.setup_seconds, self.probe.float_loss)
        self._sens: Optional[dict[str, dict[int, float]]] = None
        self._energy = None

    # ------------------------------------------------------------------ pieces
    def layers(self, a: dict[str, int]) -> dict[str, nn.Module]:
        return {p: self.cands.table[p][b].layer for p, b in a.items()}

    def measure(self, a: dict[str, int]) -> float:
        return self.probe.loss_with(self.layers(a))

    def sensitivities(self) -> dict[str, dict[int, float]]:
        """Loss increase (short calibration slice) with only one layer quantized,
        for every layer and candidate; the top candidate is measured too."""
        if self._sens is None:
            base = self.sens_probe.float_loss
            todo = [(p, b) for p in self.paths for b in self.cands.bits]
            sens: dict[str, dict[int, float]] = {p: {} for p in self.paths}
            for p, b in tqdm(todo, desc="search: sensitivities", disable=not self.progress):
                sens[p][b] = self.sens_probe.loss_with({p: self.cands.table[p][b].layer}) - base
            self._sens = sens
        return self._sens

    def energy(self):
        if self._energy is None:
            self._energy = channel_energy(self.model, self.paths, self.batches)
        return self._energy

    def objective(self, budget_bits=None, budget_bytes=None, lam=None) -> Objective:
        if budget_bits is not None:
            if budget_bytes is not None:
                raise ValueError("give budget_bits or budget_bytes, not both")
            if not budget_bits > 0:
                raise ValueError(f"budget_bits must be > 0, got {budget_bits}")
            budget_bytes = int(budget_bits * sum(self.cands.numel.values()) / 8)
        return Objective(budget_bytes=budget_bytes, lam=lam)

    def uniform(self, b: int) -> dict[str, int]:
        return {p: b for p in self.paths}

    def best_start(self, sens: dict[str, dict[int, float]], obj: Objective) -> dict[str, int]:
        """The measured-best of the sensitivity allocations from every feasible
        floor (all layers at one candidate width, then upgrades by sensitivity
        per byte). Per-layer sensitivities add up badly at 2 bits, so an
        allocation from the lowest width alone can end far worse than a uniform
        setting; starting from each floor keeps the search at least as good as
        the best uniform setting that fits."""
        starts = []
        for b in self.cands.bits:
            if obj.feasible(self.cands, self.uniform(b)):
                a = allocate(self.cands, sens, obj, floor=b)
                starts.append((obj.value(self.measure(a), self.cands, a), b, a))
        if not starts:
            return allocate(self.cands, sens, obj)
        val, b, a = min(starts, key=lambda t: t[0])
        logger.info("search: start from floor W%d (objective %.4f; floors tried: %s)", b, val,
                    ", ".join(f"W{x}: {v:.4f}" for v, x, _ in starts))
        return a

    # ------------------------------------------------------------------ search
    def run(self, strategy: str = "greedy", *, budget_bits=None, budget_bytes=None, lam=None, max_evals: int = 60,
            groups: Optional[dict[str, list[str]]] = None) -> SearchResult:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        obj = self.objective(budget_bits, budget_bytes, lam)
        check_budget(self.cands, obj)
        t0 = time.perf_counter()
        evals0 = self.probe.evals
        history, stopped = [], ""
        if strategy == "entropy":
            D = distortion(self.cands, self.model, self.energy())
            a = entropy(self.cands, D, obj)
            loss = self.measure(a)
            val = obj.value(loss, self.cands, a)
        elif strategy == "grid":
            groups = groups or default_groups(self.paths, self.spec.arch.layers_path)
            a, val, history = grid(self.cands, self.sensitivities(), obj, groups, self.measure)
            if a is None:
                raise ValueError("grid: no group assignment fits the budget; use finer groups or another strategy")
            loss = self.measure(a)
        else:
            sens = self.sensitivities()
            start = self.best_start(sens, obj)
            log = (lambda m: tqdm.write(m)) if self.progress else None
            a, val, trace = greedy(self.cands, sens, obj, start, self.measure, max_evals=max_evals, progress=log)
            loss = self.measure(a)
            history = [{"objective": trace.start_objective, "changes": {}}] + trace.steps
            stopped = trace.stopped
        nbytes = self.cands.bytes_of(a)
        logger.info("search: %s -> %.3f bits per weight, loss %.4f, %d evaluations, %.1f s %s", strategy,
                    self.cands.bits_per_weight(a), loss, self.probe.evals - evals0, time.perf_counter() - t0, stopped)
        return SearchResult(strategy=strategy, base=self.base, bits=self.cands.bits, group_size=self.group_size,
                            scale_dtype=self.scale_dtype, assignment=a, bytes=nbytes, bits_per_weight=self.cands.bits_per_weight(a),
                            fp16_reduction=self.cands.fp16_bytes() / nbytes, float_loss=self.probe.float_loss,
                            loss=loss, objective=val, evals=self.probe.evals - evals0,
                            seconds=time.perf_counter() - t0, history=history, stopped=stopped)

    def apply(self, a: dict[str, int]) -> nn.Module:
        """Swap the assignment's QLinear layers into the model (in place)."""
        from ..methods.mixed import MixedConfig

        for p, b in a.items():
            swap(self.model, p, self.cands.table[p][b].layer)
        self.model.llmeq_config = MixedConfig(bitmap=dict(a), base=self.base, w_group_size=self.group_size,
                                              w_scale_dtype=self.scale_dtype, rotate=self.rotate,
                                              rotate_seed=self.rotate_seed)
        return self.model


def search(model: nn.Module, tokenizer=None, *, budget_bits: Optional[float] = None,
           budget_bytes: Optional[int] = None, lam: Optional[float] = None, strategy: str = "greedy",
           bits=(2, 3, 4, 8), group_size: int = 64, base: str = "rtn", calib=None, n_calib: int = 16,
           n_probe: int = 4, calib_seq_len: int = 512, exclude=("lm_head",), max_evals: int = 60,
           scale_dtype: str = "float16", apply: bool = True, progress: bool = True,
           rotate: Optional[str] = None) -> SearchResult:
    """Search a bit width per layer and (``apply``) quantize the model with it.

    Give one of ``budget_bits`` (average bits per weight, scales and
    zero-points included), ``budget_bytes`` or ``lam`` (loss per MiB).
    ``calib``: text file, list of strings or list of token tensors
    (default: WikiText-2 validation, needs ``tokenizer``). From text,
    ``n_calib`` windows calibrate the candidates and ``n_probe`` other windows
    (another seed) measure assignments; token tensors serve both.
    ``scale_dtype``: what the candidates hold their scales in (float16 by
    default: 0.25 bits per weight less than float32 at group 64).
    ``rotate="hadamard"``: rotate the model first (docs/results.md: with GPTQ
    candidates it pays; with RTN ones it can hurt).
    """
    probe = None
    if isinstance(calib, (list, tuple)) and calib and isinstance(calib[0], torch.Tensor):
        batches = [c if c.dim() == 2 else c.unsqueeze(0) for c in calib]
    else:
        if tokenizer is None:
            raise ValueError("search needs calibration data: pass tokenizer= (to tokenize text) or calib= as a "
                             "list of token tensors")
        batches, probe = calibration_and_probe(tokenizer, calib, n_calib, n_probe, calib_seq_len, model)
    s = Searcher(model, batches, bits=bits, group_size=group_size, base=base, exclude=exclude, probe_batches=probe,
                 scale_dtype=scale_dtype, progress=progress, rotate=rotate)
    res = s.run(strategy, budget_bits=budget_bits, budget_bytes=budget_bytes, lam=lam, max_evals=max_evals)
    if apply:
        s.apply(res.assignment)
    return res


def calibration_and_probe(tokenizer, source, n_calib: int, n_probe: int, seq_len: int, model=None):
    """Calibration windows (seed 0, as every method draws them) and held-out probe windows (seed 1);
    ``source="generated"``: sequences the float ``model`` samples, the same seeds."""
    return (batches_from(source, tokenizer, model, n_samples=n_calib, seq_len=seq_len),
            batches_from(source, tokenizer, model, n_samples=n_probe, seq_len=seq_len, seed=1))


def write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


__all__ = ["STRATEGIES", "SearchResult", "Searcher", "calibration_and_probe", "channel_energy", "collect_hessians",
           "search", "write_json",
           "Candidates", "MIB"]
