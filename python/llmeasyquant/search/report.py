"""Pareto table (size vs perplexity across budgets, searched vs uniform) and
the plots of a search: ``pareto`` (perplexity against bits per weight) and
``bitmap`` (the chosen bit width of every layer, blocks x projections)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import Searcher
from .strategies import MIB


def pareto(s: Searcher, budgets: list[float], strategy: str, ppl_of: Callable[[dict[str, int]], float],
           max_evals: int = 60, progress: Callable[[str], None] = print) -> list[dict]:
    """One row per uniform candidate and per budget (bits per weight)."""
    rows = []
    fp16 = s.cands.fp16_bytes()

    def row(kind, label, a, loss, extra=None):
        nbytes = s.cands.bytes_of(a)
        r = {"kind": kind, "setting": label, "bits_per_weight": s.cands.bits_per_weight(a),
             "MiB": nbytes / MIB, "fp16_reduction": fp16 / nbytes, "calib_loss": loss, "ppl": ppl_of(a)}
        r.update(extra or {})
        progress(f"{kind} {label}: {r['bits_per_weight']:.3f} bits/weight, {r['fp16_reduction']:.2f}x vs fp16, "
                 f"perplexity {r['ppl']:.3f}")
        rows.append(r)
        return r

    for b in s.cands.bits:
        a = s.uniform(b)
        row("uniform", f"W{b} {s.base}" + ("" if b == 8 else f" g{s.group_size}"), a, s.measure(a))
    for budget in budgets:
        res = s.run(strategy, budget_bits=budget, max_evals=max_evals)
        row("searched", f"{strategy} <= {budget:g} bits", res.assignment, res.loss,
            {"budget_bits": budget, "counts": {str(k): v for k, v in res.counts().items()},
             "assignment": res.assignment, "evals": res.evals, "search_s": res.seconds})
    return rows


def pareto_table(rows: list[dict], float_ppl: float) -> str:
    lines = ["| kind | setting | bits/weight | MiB | vs fp16 | calib loss | perplexity | Δ% vs float | mix |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = ", ".join(f"{n}×W{b}" for b, n in r.get("counts", {}).items()) or "—"
        lines.append(f"| {r['kind']} | {r['setting']} | {r['bits_per_weight']:.3f} | {r['MiB']:.1f} | "
                     f"{r['fp16_reduction']:.2f}x | {r['calib_loss']:.4f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / float_ppl - 1):+.2f} | {mix} |")
    return "\n".join(lines)


def _save(fig, out_dir: str, stem: str) -> list[str]:
    from ..plots import _save as save

    return save(fig, out_dir, stem)


def plot_pareto(rows: list[dict], float_ppl: float, out_dir: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, style in (("uniform", dict(marker="s", color="0.4", ls="none")),
                        ("searched", dict(marker="o", color="tab:blue", ls="-"))):
        pts = sorted((r["bits_per_weight"], r["ppl"], r["setting"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=kind, **style)
            for x, y, lab in pts:
                if kind == "uniform":
                    ax.annotate(lab.split()[0], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(float_ppl, color="0.6", ls=":", lw=1, label=f"float ({float_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight held (scales and zero-points included)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = _save(fig, out_dir, "pareto")
    plt.close(fig)
    return paths


def plot_bitmap(assignment: dict[str, int], layers_path: str, out_dir: str, title: str,
                stem: str = "bitmap") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    blocks, projs = {}, []
    for p, b in assignment.items():
        if not p.startswith(layers_path + "."):
            continue
        i, proj = p[len(layers_path) + 1:].split(".", 1)
        blocks.setdefault(int(i), {})[proj] = b
        if proj not in projs:
            projs.append(proj)
    n = max(blocks) + 1 if blocks else 0
    grid = np.full((len(projs), n), np.nan)
    for i, row in blocks.items():
        for proj, b in row.items():
            grid[projs.index(proj), i] = b
    levels = [2, 3, 4, 8]
    cmap = ListedColormap(["tab:red", "tab:orange", "tab:green", "tab:blue"])
    norm = BoundaryNorm([1.5, 2.5, 3.5, 6, 9], cmap.N)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.25 * n + 2.5), 0.4 * len(projs) + 1.6))
    im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(projs)), [p.split(".")[-1] for p in projs], fontsize=8)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax, ticks=levels)
    cb.set_label("weight bits")
    fig.tight_layout()
    paths = _save(fig, out_dir, stem)
    plt.close(fig)
    return paths
