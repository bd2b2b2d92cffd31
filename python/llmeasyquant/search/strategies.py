"""Bit-width assignment strategies. All minimise

    L_task(b) + lam * sum_l bytes_l(b_l) / 2**20        (paper Theorem B.19, Phi = MiB held)

or, with a budget, L_task subject to sum_l bytes_l <= budget. An assignment
maps each layer path to a bit width among the candidates.

* ``entropy`` - rate-distortion allocation from statistics alone (no model
  run per candidate): distortion D_l(b) = sum_j E[x_j^2] * ||W_:j - Q_b(W)_:j||^2
  (the layer's output error for inputs with the calibrated channel energies),
  then bits bought greedily where they remove the most distortion per byte.
* ``grid`` - exhaustive over groups of layers (by default one group per
  projection type, e.g. all q_proj together): every combination of candidate
  bits per group is scored with the measured per-layer sensitivities (sum
  over layers), the best few under the budget are measured for real.
* ``greedy`` - coordinate descent on the measured calibration loss from the
  sensitivity allocation: each step tries the most promising single moves
  (raise one layer / lower one layer / swap two) and takes the best one that
  lowers the objective; it stops at a local optimum (no tried move helps) or
  after ``max_evals`` loss evaluations. It never ends above its start.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .candidates import Candidates

MIB = 2**20


@dataclass
class Objective:
    """Budget (bytes) or penalty (lam per MiB)."""

    budget_bytes: Optional[int] = None
    lam: Optional[float] = None

    def __post_init__(self):
        if (self.budget_bytes is None) == (self.lam is None):
            raise ValueError("give exactly one of a budget (bits per weight or bytes) and lam")
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")

    def feasible(self, c: Candidates, a: dict[str, int]) -> bool:
        return self.budget_bytes is None or c.bytes_of(a) <= self.budget_bytes

    def value(self, loss: float, c: Candidates, a: dict[str, int]) -> float:
        return loss + (0.0 if self.lam is None else self.lam * c.bytes_of(a) / MIB)


def check_budget(c: Candidates, obj: Objective) -> None:
    if obj.budget_bytes is None:
        return
    low = {p: c.bits[0] for p in c.paths}
    least = c.bytes_of(low)
    if least > obj.budget_bytes:
        raise ValueError(f"impossible budget: {obj.budget_bytes} bytes ({8 * obj.budget_bytes / sum(c.numel.values()):.3f} "
                         f"bits per weight); the smallest assignment (all {c.bits[0]}-bit) holds {least} bytes "
                         f"({c.bits_per_weight(low):.3f} bits per weight)")


def allocate(c: Candidates, cost: dict[str, dict[int, float]], obj: Objective, floor: int | None = None) -> dict[str, int]:
    """Start every layer at ``floor`` (default: the lowest candidate); repeatedly
    buy the upgrade (one layer to a higher candidate) with the largest cost
    reduction per extra byte that the budget allows (with lam: while the
    reduction exceeds lam per MiB)."""
    check_budget(c, obj)
    a = {p: c.bits[0] if floor is None else floor for p in c.paths}
    spent = c.bytes_of(a)
    while True:
        best, best_rate = None, 0.0
        for p in c.paths:
            cur = a[p]
            for b in c.bits:
                if b <= cur:
                    continue
                extra = c.table[p][b].bytes - c.table[p][cur].bytes
                gain = cost[p][cur] - cost[p][b]
                if extra <= 0 or gain <= 0:
                    continue
                if obj.budget_bytes is not None and spent + extra > obj.budget_bytes:
                    continue
                if obj.lam is not None and gain <= obj.lam * extra / MIB:
                    continue
                rate = gain / extra
                if rate > best_rate:
                    best, best_rate = (p, b, extra), rate
        if best is None:
            return a
        p, b, extra = best
        a[p] = b
        spent += extra


def distortion(c: Candidates, model, energy: dict[str, torch.Tensor]) -> dict[str, dict[int, float]]:
    """D_l(b) = sum_j E[x_j^2] ||W_:j - Q_b(W)_:j||^2 for every layer and candidate."""
    from ..methods._common import weight_nk

    out = {}
    for p in c.paths:
        W = weight_nk(model.get_submodule(p)).detach().float()
        e = energy[p].float()
        out[p] = {b: float(((W - c.table[p][b].layer.dequantize()) ** 2).sum(0) @ e) for b in c.bits}
    return out


def entropy(c: Candidates, D: dict[str, dict[int, float]], obj: Objective) -> dict[str, int]:
    return allocate(c, D, obj)


def default_groups(paths: list[str], layers_path: str) -> dict[str, list[str]]:
    """One group per projection type (the path inside the block)."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        key = p[len(layers_path) + 1:].split(".", 1)[1] if p.startswith(layers_path + ".") else p
        groups.setdefault(key, []).append(p)
    return groups


def grid(c: Candidates, sens: dict[str, dict[int, float]], obj: Objective, groups: dict[str, list[str]],
         measure: Callable[[dict[str, int]], float], top: int = 3, max_combos: int = 200_000):
    """Exhaustive over group assignments, scored by summed sensitivities; the
    ``top`` best are measured. Returns (assignment, measured loss, history)."""
    names = list(groups)
    n = len(c.bits) ** len(names)
    if n > max_combos:
        raise ValueError(f"grid: {len(c.bits)} candidates ^ {len(names)} groups = {n} combinations "
                         f"(limit {max_combos}); use fewer groups or the greedy strategy")
    check_budget(c, obj)
    # per group and bits: summed sensitivity and bytes
    gs = {g: {b: sum(sens[p][b] for p in groups[g]) for b in c.bits} for g in names}
    gb = {g: {b: sum(c.table[p][b].bytes for p in groups[g]) for b in c.bits} for g in names}
    scored = []
    for combo in itertools.product(c.bits, repeat=len(names)):
        nbytes = sum(gb[g][b] for g, b in zip(names, combo))
        if obj.budget_bytes is not None and nbytes > obj.budget_bytes:
            continue
        proxy = sum(gs[g][b] for g, b in zip(names, combo)) + (0.0 if obj.lam is None else obj.lam * nbytes / MIB)
        scored.append((proxy, combo))
    scored.sort(key=lambda t: t[0])
    best, best_val, history = None, float("inf"), []
    for _, combo in scored[:top]:
        a = {p: b for g, b in zip(names, combo) for p in groups[g]}
        loss = measure(a)
        val = obj.value(loss, c, a)
        history.append({"assignment": dict(zip(names, combo)), "loss": loss, "objective": val})
        if val < best_val:
            best, best_val = a, val
    return best, best_val, history


@dataclass
class GreedyTrace:
    start_objective: float
    steps: list[dict] = field(default_factory=list)
    evals: int = 0
    stopped: str = ""


def greedy(c: Candidates, sens: dict[str, dict[int, float]], obj: Objective, start: dict[str, int],
           measure: Callable[[dict[str, int]], float], max_evals: int = 60, tries: int = 6,
           progress: Optional[Callable[[str], None]] = None) -> tuple[dict[str, int], float, GreedyTrace]:
    """Coordinate descent on the measured objective from ``start``."""
    if not obj.feasible(c, start):
        raise ValueError("greedy: the start assignment exceeds the budget")
    a = dict(start)
    cur = obj.value(measure(a), c, a)
    trace = GreedyTrace(cur, evals=1)
    levels = list(c.bits)

    def up(p):
        i = levels.index(a[p])
        return levels[i + 1] if i + 1 < len(levels) else None

    def down(p):
        i = levels.index(a[p])
        return levels[i - 1] if i > 0 else None

    while trace.evals < max_evals:
        moves = []  # (predicted gain, changes)
        for p in c.paths:
            u = up(p)
            if u is not None:
                moves.append((sens[p][a[p]] - sens[p][u], {p: u}))
            d = down(p)
            if d is not None:
                moves.append((sens[p][a[p]] - sens[p][d], {p: d}))
        ups = sorted(((sens[p][a[p]] - sens[p][up(p)], p) for p in c.paths if up(p) is not None), reverse=True)[:tries]
        downs = sorted(((sens[p][a[p]] - sens[p][down(p)], p) for p in c.paths if down(p) is not None),
                       reverse=True)[:tries]
        for gu, pu in ups:  # swaps: buy bits where they help most, pay where they hurt least
            for gd, pd in downs:
                if pu != pd:
                    moves.append((gu + gd, {pu: up(pu), pd: down(pd)}))
        feasible = []
        for g, ch in moves:
            b = {**a, **ch}
            if not obj.feasible(c, b):
                continue
            if obj.lam is not None:
                g -= obj.lam * (c.bytes_of(b) - c.bytes_of(a)) / MIB
            feasible.append((g, ch))
        feasible.sort(key=lambda t: -t[0])
        best, best_val = None, cur
        for g, ch in feasible[:tries]:
            if trace.evals >= max_evals:
                break
            b = {**a, **ch}
            val = obj.value(measure(b), c, b)
            trace.evals += 1
            if val < best_val:
                best, best_val = ch, val
        if best is None:
            trace.stopped = "local optimum (no tried move lowers the objective)" if trace.evals < max_evals \
                else f"evaluation limit ({max_evals})"
            break
        a.update(best)
        trace.steps.append({"changes": best, "objective": best_val})
        cur = best_val
        if progress:
            progress(f"greedy step {len(trace.steps)}: objective {cur:.5f}")
    else:
        trace.stopped = f"evaluation limit ({max_evals})"
    return a, cur, trace
