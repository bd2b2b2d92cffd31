"""What a search leaves behind: the Pareto table (size vs perplexity across
budgets, searched vs uniform), the plots (``pareto``: perplexity against bits
per weight; ``bitmap``: the chosen bit width of every layer, blocks x
projections) and the output folder of ``llmeasyquant search``
(:func:`write_search_output`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import Searcher, SearchResult, write_json
from .strategies import MIB

SEARCH_FILE = "search.json"  # its presence marks a folder written by write_search_output


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


def is_search_output(folder) -> bool:
    """A folder :func:`write_search_output` wrote (it may be replaced without ``overwrite``)."""
    return os.path.isfile(os.path.join(folder, SEARCH_FILE))


def check_search_destination(path, *, overwrite: bool = False) -> Path:
    """Raise (before any work) if writing a search output to ``path`` would
    harm something: see :func:`llmeasyquant.outdir.check_destination`."""
    from ..outdir import check_destination

    return check_destination(path, overwrite=overwrite, is_ours=is_search_output, what="search --out")


def search_summary(result: SearchResult) -> str:
    """One line: the settings searched and what the assignment costs and loses."""
    return (f"{result.strategy} search ({result.base}, candidates {', '.join(f'W{b}' for b in result.bits)}, "
            f"g{result.group_size}, {result.scale_dtype} scales): {result.bits_per_weight:.3f} bits per weight, "
            f"{result.fp16_reduction:.2f}x smaller than fp16, calibration loss {result.loss:.4f} (float "
            f"{result.float_loss:.4f}), mix {result.counts()}, {result.evals} loss evaluations")


def _pareto_section(searcher: Searcher, tokenizer, budgets: Sequence[float], strategy: str, out_dir: str, *,
                    model_name: str, max_windows: int, max_evals: int,
                    progress: Callable[[str], None]) -> tuple[list[str], str, list[str]]:
    """pareto.json and the plot in ``out_dir``; returns (Markdown lines, the
    table among them, figure paths)."""
    from ..data import default_eval_file
    from ..eval.perplexity import perplexity, tokenize_file

    model = searcher.model
    ids = tokenize_file(tokenizer, default_eval_file())
    fppl = perplexity(model, ids=ids, max_windows=max_windows, progress=False).ppl

    def ppl_of(a):
        with searcher.probe.swapped(searcher.layers(a)):
            return perplexity(model, ids=ids, max_windows=max_windows, progress=False).ppl

    rows = pareto(searcher, list(budgets), strategy, ppl_of, max_evals=max_evals, progress=progress)
    write_json({"float_ppl": fppl, "rows": rows}, os.path.join(out_dir, "pareto.json"))
    table = pareto_table(rows, fppl)
    md = [f"Perplexity: WikiText-2 raw test, first {max_windows} windows x 2048 tokens; float {fppl:.3f}.", "",
          table, ""]
    try:
        figs = plot_pareto(rows, fppl, out_dir, f"{model_name}: perplexity vs size ({searcher.base} base)")
    except ImportError:  # matplotlib is optional here; the table holds the same numbers
        figs = []
    return md, table, figs


def write_search_output(searcher: Searcher, result: SearchResult, path, *, tokenizer=None, model_name: str,
                        budgets: Sequence[float] = (), max_windows: int = 16, max_evals: int = 60,
                        save_model: bool = True, command: str = "", overwrite: bool = False,
                        progress: Optional[Callable[[str], None]] = print) -> list[str]:
    """Write the folder ``path`` of a finished search: search.json (the
    result), bitmap.json, bitmap.png/.svg, search.md and, with ``save_model``,
    the quantized model in ``model/``. ``budgets`` (bits per weight) add the
    Pareto evaluation over ``max_windows`` perplexity windows (pareto.json,
    pareto.png, a table in search.md; needs ``tokenizer``); ``progress`` gets
    one line per Pareto point (None: quiet). ``command`` is recorded in
    search.md.

    Applies ``result.assignment`` to ``searcher.model`` (in place). The folder
    is replaced atomically (see :func:`check_search_destination`): a failure or
    kill midway leaves ``path`` as it was. Returns the lines worth showing: the
    summary and, with budgets, the Pareto table."""
    from ..io import save
    from ..outdir import replace_atomically

    if budgets and tokenizer is None:
        raise ValueError("write_search_output: the Pareto evaluation (budgets) needs a tokenizer, got None")
    dest = check_search_destination(path, overwrite=overwrite)
    progress = progress or (lambda m: None)
    with replace_atomically(dest) as tmp_path:
        tmp = str(tmp_path)
        summary = search_summary(result)
        write_json(result.to_dict(), os.path.join(tmp, SEARCH_FILE))
        write_json(result.assignment, os.path.join(tmp, "bitmap.json"))
        figs = []
        try:
            figs += plot_bitmap(result.assignment, searcher.spec.arch.layers_path, tmp,
                                f"{model_name}: bits per layer ({result.strategy}, "
                                f"{result.bits_per_weight:.2f} bits/weight)")
        except ImportError as err:
            summary += f" (plots not drawn: {err})"
        md = [f"# Mixed-precision search: {model_name}", "", summary, ""]
        shown = [summary]
        if budgets:
            section, table, pfigs = _pareto_section(searcher, tokenizer, budgets, result.strategy, tmp,
                                                    model_name=model_name, max_windows=max_windows,
                                                    max_evals=max_evals, progress=progress)
            md += section
            figs += pfigs
            shown.append(table)
        md += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figs if f.endswith(".png")]
        md += ["", f"Command: `{command}`", ""] if command else [""]
        with open(os.path.join(tmp, "search.md"), "w") as fh:
            fh.write("\n".join(md))
        searcher.apply(result.assignment)
        if save_model:
            save(searcher.model, os.path.join(tmp, "model"), tokenizer=tokenizer)
    return shown
