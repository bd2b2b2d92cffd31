"""Plots of a method comparison (matplotlib, PNG + SVG), drawn from the
numbers in compare.json so they can be re-rendered without re-running:

* ``weights``: distribution of one layer's weights per method — float
  histogram under the dequantized one, with the clipping range (the largest
  representable magnitude of the layer's grid) marked (paper Figure 1);
* ``ppl_memory``: perplexity against bytes held by the linear layers, one
  point per method (paper Figure 2);
* ``breakdown``: stacked time per phase (paper eq. 12) per block or per run.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .models.extract import extract
from .nn.qlinear import QLinear
from .nn.replace import is_quantizable

HIST_BINS = 120


def pick_layer(model: nn.Module) -> str:
    """A representative projection: the architecture's representative linear
    (``ArchSpec.representative``, the MLP output projection of the declared
    ones; the block's last linear for the generic fallback) in the middle block."""
    try:
        spec = extract(model)
    except ValueError:
        spec = None
    if spec is not None:
        name = spec.arch.representative or spec.block_linears[-1]
        return f"{spec.arch.layers_path}.{len(spec.blocks) // 2}.{name}"
    # not a decoder stack at all: the middle linear
    cand = [n for n, m in model.named_modules() if (isinstance(m, QLinear) or is_quantizable(m)) and "lm_head" not in n]
    if not cand:
        raise ValueError("pick_layer: the model has no linear layers")
    return cand[len(cand) // 2]


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The float weight [out, in] the layer multiplies with (dequantized for QLinear)."""
    m = model.get_submodule(name)
    if isinstance(m, QLinear):
        return m.dequantize(torch.float32)
    w = m.weight.detach().float()
    return w.t() if type(m).__name__ == "Conv1D" else w


def weight_histogram(w: torch.Tensor, lo: float, hi: float) -> dict:
    counts, edges = np.histogram(w.flatten().cpu().numpy(), bins=HIST_BINS, range=(lo, hi))
    return {"counts": counts.tolist(), "lo": lo, "hi": hi, "absmax": float(w.abs().max())}


def _save(fig, out_dir: str, stem: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        p = os.path.join(out_dir, f"{stem}.{ext}")
        tmp = f"{p}.tmp{os.getpid()}.{ext}"
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, p)
        paths.append(p)
    return paths


def plot_weights(rows: list[dict], layer: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_hist = [r for r in rows if r.get("weight_hist")]
    if not with_hist:
        return []
    base = next((r for r in with_hist if r["method"] == "float"), None)
    shown = [r for r in with_hist if r["method"] != "float" and "KV" not in r["bits"]] or with_hist
    cols = min(3, len(shown))
    nrows = -(-len(shown) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, shown):
        h = r["weight_hist"]
        centers = np.linspace(h["lo"], h["hi"], HIST_BINS + 1)
        centers = (centers[:-1] + centers[1:]) / 2
        width = (h["hi"] - h["lo"]) / HIST_BINS
        if base is not None:
            ax.bar(centers, base["weight_hist"]["counts"], width=width, color="0.8", label="float")
        ax.bar(centers, h["counts"], width=width, color="tab:blue", alpha=0.75, label="quantized")
        if base is not None:  # clipping shows as the quantized range ending inside the float range
            ax.axvline(base["weight_hist"]["absmax"], color="0.45", ls=":", lw=1)
            ax.axvline(-base["weight_hist"]["absmax"], color="0.45", ls=":", lw=1, label="float max |w|")
        ax.axvline(h["absmax"], color="tab:red", ls="--", lw=1)
        ax.axvline(-h["absmax"], color="tab:red", ls="--", lw=1, label="quantized max |w|")
        ax.locator_params(axis="x", nbins=5)
        ax.tick_params(labelsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{r['method']} ({r['bits']})", fontsize=9)
        ax.set_xlabel("weight value")
        ax.set_ylabel("count (log)")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Weights of {layer} after each method (float in grey)", fontsize=10)
    fig.tight_layout()
    paths = _save(fig, out_dir, "weights")
    plt.close(fig)
    return paths


def plot_ppl_memory(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # rows of one memory size (all W8A8 methods; KV rows keep float's weights) share an x:
    # their labels are stacked upwards in perplexity order so they do not overprint
    stack: dict[int, int] = {}
    for r in sorted(rows, key=lambda r: r["ppl"]):
        kv = "KV" in r["bits"]
        ax.scatter(r["linear_MiB"], r["ppl"], marker="s" if kv else "o",
                   color="0.4" if r["method"] == "float" else ("tab:orange" if kv else "tab:blue"))
        k = stack.get(round(r["linear_MiB"]), 0)
        stack[round(r["linear_MiB"])] = k + 1
        ax.annotate(f"{r['method']}", (r["linear_MiB"], r["ppl"]), fontsize=7, xytext=(5, -3 + 9 * k),
                    textcoords="offset points")
    ppls = [r["ppl"] for r in rows if r["ppl"] == r["ppl"] and r["ppl"] > 0]
    if ppls and max(ppls) > 5 * min(ppls):  # W3 / KV2 rows next to near-float ones
        ax.set_yscale("log")
        ticks = [v for v in (10, 15, 20, 25, 30, 40, 50, 70, 100, 150, 200, 300, 500, 1e3, 2e3, 5e3, 1e4, 1e5)
                 if 0.9 * min(ppls) <= v <= 1.1 * max(ppls)]
        ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()
    f = next((r for r in rows if r["method"] == "float"), None)
    if f is not None:
        ax.axhline(f["ppl"], color="0.6", ls=":", lw=1, label=f"float ({f['ppl']:.2f})")
        ax.legend(fontsize=8)
    ax.set_xlabel("bytes held by the linear layers (MiB; scales and zero-points included)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)" + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.set_title("Perplexity vs memory per method (squares: KV-cache quantization)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = _save(fig, out_dir, "ppl_memory")
    plt.close(fig)
    return paths


def plot_breakdown(bars: dict[str, dict[str, float]], out_dir: str, stem: str, title: str,
                   xlabel: str = "decoder block") -> list[str]:
    """Stacked bars of time per phase (paper eq. 12: load, calibration, quantize,
    GEMM, communication, sync), one bar per key of ``bars`` (blocks, or runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .sharding import PHASES

    labels = list(bars)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(labels) + 2), 4.2))
    bottom = np.zeros(len(labels))
    colors = dict(zip(PHASES, ["tab:gray", "tab:olive", "tab:blue", "tab:green", "tab:red", "tab:purple"]))
    for p in PHASES:
        vals = np.array([bars[k].get(p, 0.0) for k in labels])
        ax.bar(range(len(labels)), vals, bottom=bottom, color=colors[p], label=p)
        bottom += vals
    short = [k.rsplit(".", 1)[-1] if k.rsplit(".", 1)[-1].isdigit() else k for k in labels]
    ax.set_xticks(range(len(labels)), short, rotation=90 if len(labels) > 12 else 0, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths = _save(fig, out_dir, stem)
    plt.close(fig)
    return paths
