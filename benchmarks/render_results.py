"""Render docs/results.md from a `llmeasyquant compare --methods bar` run
(its compare.json): the table, the protocol, and each accuracy bar of the
methods issue checked (PASS / FAIL / pending while rows are missing).

Run:  python benchmarks/render_results.py docs/results/compare.json [--note TEXT] > docs/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmeasyquant.compare import format_table


def _bars(rows: dict) -> list[tuple[str, str, str]]:
    def d(name):
        r = rows.get(name)
        return None if r is None else r["delta_pct"]

    out = []

    def check(text, names, cond, shown):
        vals = [d(n) for n in names]
        if any(v is None for v in vals):
            out.append((text, "pending", "rows missing: " + ", ".join(n for n, v in zip(names, vals) if v is None)))
        else:
            out.append((text, "PASS" if cond(*vals) else "FAIL", shown(*vals)))

    check("SmoothQuant W8A8 dynamic: ≤ 1 % increase", ["smoothquant-w8a8"], lambda s: s <= 1.0,
          lambda s: f"{s:+.2f} %")
    check("Static per-tensor W8A8: SmoothQuant at most half of AbsMax's increase",
          ["absmax-w8a8-static", "smoothquant-w8a8-static"], lambda a, s: s <= 0.5 * a,
          lambda a, s: f"AbsMax {a:+.2f} %, SmoothQuant {s:+.2f} % (ratio {s / a:.2f})")
    for m in ("gptq", "awq"):
        check(f"W4 g64: {m.upper()} ≤ 0.7x RTN's increase", ["rtn-w4-g64", f"{m}-w4-g64"],
              lambda r, x: x <= 0.7 * r, lambda r, x: f"RTN {r:+.2f} %, {m.upper()} {x:+.2f} % (ratio {x / r:.2f})")
        check(f"W3 g64: {m.upper()} finite and well below RTN (≤ 0.5x)", ["rtn-w3-g64", f"{m}-w3-g64"],
              lambda r, x: x == x and x <= 0.5 * r,
              lambda r, x: f"RTN {r:+.2f} %, {m.upper()} {x:+.2f} % (ratio {x / r:.2f})")
    check("SimQuant KV 4-bit: ≤ 2 % increase", ["simquant-kv4"], lambda k: k <= 2.0, lambda k: f"{k:+.2f} %")
    check("SimQuant KV 2-bit: reported", ["simquant-kv2"], lambda k: True, lambda k: f"{k:+.2f} %")
    return out


# What the method papers publish (WikiText-2 perplexity; float -> quantized), to
# set our rows beside. Different models, group sizes and protocols: compare the
# relative increases and the ordering, not the perplexities.
GPTQ_URL = "https://arxiv.org/abs/2210.17323"
AWQ_URL = "https://arxiv.org/abs/2306.00978"
SQ_URL = "https://arxiv.org/abs/2211.10438"
KVQ_URL = "https://arxiv.org/abs/2401.18079"
PUBLISHED = [
    # (our row, paper setting, float ppl, quantized ppl, source)
    ("rtn-w4-g64", "RTN W4 per-row, OPT-125M (GPTQ Table 3)", 27.65, 37.28, GPTQ_URL),
    ("gptq-w4-g64", "GPTQ W4 per-row, OPT-125M (GPTQ Table 3)", 27.65, 31.12, GPTQ_URL),
    ("rtn-w4-g64", "RTN W4 per-row, OPT-350M (GPTQ Table 3)", 22.00, 25.94, GPTQ_URL),
    ("gptq-w4-g64", "GPTQ W4 per-row, OPT-350M (GPTQ Table 3)", 22.00, 24.24, GPTQ_URL),
    ("rtn-w3-g64", "RTN W3 per-row, OPT-125M (GPTQ Table 3)", 27.65, 1300.0, GPTQ_URL),
    ("gptq-w3-g64", "GPTQ W3 per-row, OPT-125M (GPTQ Table 3)", 27.65, 53.85, GPTQ_URL),
    ("rtn-w4-g64", "RTN W4 g128, Llama-2-7B (AWQ Table 4)", 5.47, 5.73, AWQ_URL),
    ("awq-w4-g64", "AWQ W4 g128, Llama-2-7B (AWQ Table 4)", 5.47, 5.60, AWQ_URL),
    ("gptq-w4-g64", "GPTQ act-order W4 g128, Llama-2-7B (AWQ Table 4)", 5.47, 5.63, AWQ_URL),
    ("rtn-w3-g64", "RTN W3 g128, Llama-2-7B (AWQ Table 4)", 5.47, 6.66, AWQ_URL),
    ("awq-w3-g64", "AWQ W3 g128, Llama-2-7B (AWQ Table 4)", 5.47, 6.24, AWQ_URL),
    ("gptq-w3-g64", "GPTQ act-order W3 g128, Llama-2-7B (AWQ Table 4)", 5.47, 6.42, AWQ_URL),
    ("awq-w3-g64", "AWQ W3 g128, OPT-1.3B (AWQ Table 3; RTN: 119.47)", 14.62, 16.32, AWQ_URL),
    ("smoothquant-w8a8", "SmoothQuant O1 (per-token dynamic), OPT-175B (Table 3)", 10.99, 11.11, SQ_URL),
    ("smoothquant-w8a8-static", "SmoothQuant O3 (per-tensor static), OPT-175B (Table 3)", 10.99, 11.17, SQ_URL),
    ("absmax-w8a8-static", "naive W8A8, OPT-175B (SmoothQuant Table 3)", 10.99, 93080.0, SQ_URL),
    ("simquant-kv4", "KVQuant 4-bit, no outliers, LLaMA-7B (Table 18)", 5.68, 5.72, KVQ_URL),
    ("simquant-kv4", "KVQuant 4-bit, 1 % outliers, LLaMA-7B (Table 18)", 5.68, 5.69, KVQ_URL),
    ("simquant-kv4", "plain int4 KV, LLaMA-7B (KVQuant Table 18)", 5.68, 5.98, KVQ_URL),
    ("simquant-kv2", "KVQuant 2-bit, no outliers, LLaMA-7B (Table 18)", 5.68, 7.23, KVQ_URL),
    ("simquant-kv2", "KVQuant 2-bit, 1 % outliers, LLaMA-7B (Table 18)", 5.68, 6.01, KVQ_URL),
]


def _papers(by: dict) -> list[str]:
    lines = ["| our row | ours: Δ% (SmolLM2-135M) | paper setting | paper: float → quantized | paper Δ% |",
             "|---|---|---|---|---|"]
    for name, setting, fp, q, url in PUBLISHED:
        r = by.get(name)
        ours = "pending" if r is None else f"{r['delta_pct']:+.2f}"
        lines.append(f"| {name} | {ours} | [{setting}]({url}) | {fp:g} → {q:g} | {100 * (q / fp - 1):+.1f} |")
    return lines


def render(path: str, note: str = "") -> str:
    data = json.loads(Path(path).read_text())
    meta, rows = data["meta"], data["rows"]
    by = {r["method"]: r for r in rows}
    lines = ["# Results: methods on the real default model", "",
             f"Model: {meta['model']} (SmolLM2-135M-Instruct, fp32 weights). Generated by "
             f"`benchmarks/render_results.py {path}` from the run below; the run writes its rows as it goes "
             "and resumes with `--resume`, so a partial table means the run is still in progress.", "",
             format_table(rows), "", *([note, ""] if note else []),
             f"- Protocol: {meta['protocol']}; perplexity = exp(mean NLL) over every predicted token; SimQuant "
             "rows: one prefill per window through the quantized KV cache (every K/V quantized, no fp residual).",
             f"- Calibration: {meta['calibration']}, one set shared by every calibrated method.",
             f"- Speed: {meta['speed']}.",
             f"- Environment: {meta['environment']}.",
             f"- Command: `{meta['command']}`", "",
             "## The accuracy bar (methods issue)", "", "| bar | status | measured |", "|---|---|---|"]
    lines += [f"| {t} | {s} | {m} |" for t, s, m in _bars(by)]
    lines += ["", "## Beside the papers", "",
              "Published WikiText-2 results of the same methods on other models. Small models lose more to "
              "quantization (RTN W4 per-row: OPT-125M +35 %, OPT-350M +18 %, BLOOM-560M +16 % in GPTQ Tables "
              "3-4; Llama-2-7B at g128: +4.8 %), and SmolLM2-135M is the smallest of "
              "them, so compare the ordering and each method's share of RTN's increase, not the "
              "perplexities.", "", *_papers(by)]
    onnx_md = Path(path).with_name("onnx.md")
    if onnx_md.exists():
        lines += ["", "## ONNX export of the default model (checked in ONNX Runtime)", "", onnx_md.read_text().strip()]
    search_md = Path(path).with_name("search") / "search.md"
    if search_md.exists():
        body = search_md.read_text().strip().split("\n", 1)[1].strip()  # drop its title
        body = body.replace("](", "](results/search/")  # images live beside search.md
        lines += ["", "## Mixed-precision search (per-layer bit widths)", "", body]
    dist_md = Path(path).with_name("distributed.md")
    if dist_md.exists():
        lines += ["", "Distributed quantization of this model (wall time vs ranks, eq. 12 breakdown): "
                  "[results/distributed.md](results/distributed.md) and docs/benchmarks.md."]
    report = Path(path).with_name("report.md")
    if report.exists():
        figs = [stem for stem in ("ppl_memory", "weights") if Path(path).with_name(f"{stem}.png").exists()]
        lines += ["", "## Plots of this run", "",
                  "Perplexity vs memory per method (the paper's Figure 2) and the weights of one layer after each "
                  "method (its Figure 1: float in grey, the quantization grid and any clipping visible); rows "
                  "measured before the run recorded histograms have no panel. SmoothQuant's panel shows the "
                  "smoothed weights W·diag(s), wider than the float ones by design (its red lines); the bins "
                  "span the float range, ±1.05 max|w|.", "",
                  *[f"![{stem}](results/{stem}.png)" for stem in figs], "",
                  "The run's own report (table, plots, environment, command): "
                  "[results/report.md](results/report.md)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="?", default="docs/results/compare.json")
    ap.add_argument("--note", default="", help="a paragraph printed under the table (e.g. measurement caveats)")
    a = ap.parse_args()
    print(render(a.json, a.note), end="")
