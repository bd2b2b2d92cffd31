"""Method comparison on one model: quantize with each preset, evaluate
perplexity (WikiText-2 protocol), memory and tokens/s, and write one table
(Markdown, CSV, JSON) like the paper's Table 1.

Rows are written after every method (atomically), so a long run can be
interrupted and resumed (``resume=True`` skips presets already in the JSON
with the same protocol).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .api import quantize
from .eval import model_memory, throughput
from .eval.perplexity import perplexity, tokenize_file


@dataclass(frozen=True)
class Preset:
    name: str
    method: Optional[str]  # None: the float model
    bits: str  # what the table shows, e.g. "W8A8", "W4 g64", "KV4"
    options: dict = field(default_factory=dict)


PRESETS = {p.name: p for p in [
    Preset("float", None, "fp32"),
    Preset("smoothquant-w8a8", "smoothquant", "W8A8 dyn"),
    Preset("absmax-w8a8", "absmax", "W8A8 dyn"),
    Preset("absmax-w8a8-static", "absmax", "W8A8 static", {"act": "static"}),
    Preset("smoothquant-w8a8-static", "smoothquant", "W8A8 static", {"act": "static"}),
    Preset("zeroquant-w4a8", "zeroquant", "W4A8 g64", {"w_bits": 4, "w_group_size": 64}),
    Preset("rtn-w8", "absmax", "W8", {"act": None}),
    Preset("rtn-w4-g64", "zeropoint", "W4 g64", {"w_bits": 4, "w_group_size": 64, "act": None}),
    Preset("gptq-w4-g64", "gptq", "W4 g64", {"w_bits": 4, "w_group_size": 64}),
    Preset("awq-w4-g64", "awq", "W4 g64", {"w_bits": 4, "w_group_size": 64}),
    # AutoRound at its CPU defaults (32 x 256 calibration tokens, 40 SignSGD steps of 4 sequences per block)
    Preset("autoround-w4-g64", "autoround", "W4 g64", {"w_bits": 4, "w_group_size": 64}),
    Preset("rtn-w3-g64", "zeropoint", "W3 g64", {"w_bits": 3, "w_group_size": 64, "act": None}),
    Preset("gptq-w3-g64", "gptq", "W3 g64", {"w_bits": 3, "w_group_size": 64}),
    Preset("awq-w3-g64", "awq", "W3 g64", {"w_bits": 3, "w_group_size": 64}),
    Preset("autoround-w3-g64", "autoround", "W3 g64", {"w_bits": 3, "w_group_size": 64}),
    Preset("autoround-w2-g64", "autoround", "W2 g64", {"w_bits": 2, "w_group_size": 64}),
    # the same after a Hadamard rotation of the residual stream + online before down_proj (models/rotate.py)
    Preset("rtn-w4-g64-rot", "zeropoint", "W4 g64 rot", {"w_bits": 4, "w_group_size": 64, "act": None,
                                                         "rotate": "hadamard"}),
    Preset("gptq-w4-g64-rot", "gptq", "W4 g64 rot", {"w_bits": 4, "w_group_size": 64, "rotate": "hadamard"}),
    Preset("gptq-w3-g64-rot", "gptq", "W3 g64 rot", {"w_bits": 3, "w_group_size": 64, "rotate": "hadamard"}),
    Preset("zeroquant-w4a8-rot", "zeroquant", "W4A8 g64 rot", {"w_bits": 4, "w_group_size": 64,
                                                               "rotate": "hadamard"}),
    Preset("gptq-w4a8-g64-rot", "gptq", "W4A8 g64 rot", {"w_bits": 4, "w_group_size": 64, "act": "dynamic",
                                                         "rotate": "hadamard"}),
    Preset("absmax-w8a8-static-rot", "absmax", "W8A8 static rot", {"act": "static", "rotate": "hadamard"}),
    Preset("smoothquant-w8a8-static-rot", "smoothquant", "W8A8 static rot", {"act": "static",
                                                                             "rotate": "hadamard"}),
    Preset("simquant-kv8", "simquant", "KV8", {"k_bits": 8, "v_bits": 8, "residual_length": 0}),
    # 1 % dense-and-sparse outliers, as in KVQuant (SmolLM2, 4 x 2048 tokens: +2.53 % without, +1.95 % with)
    Preset("simquant-kv4", "simquant", "KV4 1% outl.",
           {"k_bits": 4, "v_bits": 4, "residual_length": 0, "outlier_fraction": 0.01}),
    Preset("simquant-kv2", "simquant", "KV2 1% outl.",
           {"k_bits": 2, "v_bits": 2, "residual_length": 0, "outlier_fraction": 0.01}),
    # values (and keys) rotated per head by a Hadamard inside the cache before quantizing
    Preset("simquant-kv4-vhad", "simquant", "KV4 1% outl. V-had.",
           {"k_bits": 4, "v_bits": 4, "residual_length": 0, "outlier_fraction": 0.01, "v_hadamard": True}),
    Preset("simquant-kv4-kvhad", "simquant", "KV4 1% outl. KV-had.",
           {"k_bits": 4, "v_bits": 4, "residual_length": 0, "outlier_fraction": 0.01, "k_hadamard": True,
            "v_hadamard": True}),
    Preset("simquant-kv2-vhad", "simquant", "KV2 1% outl. V-had.",
           {"k_bits": 2, "v_bits": 2, "residual_length": 0, "outlier_fraction": 0.01, "v_hadamard": True}),
    Preset("simquant-kv4-outl2", "simquant", "KV4 2% outl.",
           {"k_bits": 4, "v_bits": 4, "residual_length": 0, "outlier_fraction": 0.02}),
    Preset("simquant-kv2-outl5-vhad", "simquant", "KV2 5% outl. V-had. chunk32",
           {"k_bits": 2, "v_bits": 2, "residual_length": 0, "outlier_fraction": 0.05, "v_hadamard": True,
            "chunk_size": 32}),
    # the first token of every sequence kept in float (attention sink, as KVQuant and IntactKV do: most
    # heads put much of their attention there, and its keys are outliers on every channel)
    Preset("simquant-kv4-outl2-sink", "simquant", "KV4 2% outl. V-had. sink 1",
           {"k_bits": 4, "v_bits": 4, "residual_length": 0, "outlier_fraction": 0.02, "v_hadamard": True,
            "sink_tokens": 1}),
    # the most accurate KV4 measured (+0.89 %, 16 windows): 3 % outliers, values rotated in groups of 32,
    # sink kept; ~6.4 bits per value in an fp16 cache with scales, zero-points and outlier indices counted
    Preset("simquant-kv4-outl3-sink-vg32", "simquant", "KV4 3% outl. V-had. g32 sink 1",
           {"k_bits": 4, "v_bits": 4, "residual_length": 0, "outlier_fraction": 0.03, "v_hadamard": True,
            "v_group_size": 32, "sink_tokens": 1}),
    Preset("simquant-kv2-outl5-sink", "simquant", "KV2 5% outl. V-had. chunk32 sink 1",
           {"k_bits": 2, "v_bits": 2, "residual_length": 0, "outlier_fraction": 0.05, "v_hadamard": True,
            "chunk_size": 32, "sink_tokens": 1}),
]}

# Named sets for --methods: a few-minute default, the accuracy bar, everything.
METHOD_SETS = {
    "default": ["float", "smoothquant-w8a8", "rtn-w4-g64", "awq-w4-g64", "simquant-kv4"],
    "bar": ["float", "smoothquant-w8a8", "absmax-w8a8-static", "smoothquant-w8a8-static", "rtn-w4-g64",
            "gptq-w4-g64", "awq-w4-g64", "rtn-w3-g64", "gptq-w3-g64", "awq-w3-g64", "simquant-kv4",
            "simquant-kv2"],
    "all": list(PRESETS),
}

COLUMNS = ["method", "bits", "ppl", "delta_pct", "linear_MiB", "total_MiB", "prefill_tok_s", "decode_tok_s",
           "calib_s", "quant_s"]


def resolve_methods(spec: str) -> list[Preset]:
    """'default' | 'bar' | 'all' | comma-separated preset names ('float' is always first)."""
    names = METHOD_SETS.get(spec, [s.strip() for s in spec.split(",") if s.strip()])
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown method preset(s) {unknown}; choose from: {', '.join(PRESETS)} "
                         f"or a set: {', '.join(METHOD_SETS)}")
    if "float" in names:
        names.remove("float")
    return [PRESETS["float"]] + [PRESETS[n] for n in names]


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _text_names(rows: list[dict]) -> list[str]:
    """The other texts (``--text NAME=FILE``) the rows were scored on, in order."""
    return list(rows[0].get("texts", {})) if rows else []


def _delta(d) -> str:
    return "—" if d is None else f"{d:+.2f}"


def _row_table(rows: list[dict]) -> str:
    def fmt(v, nd=2):
        return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    names = _text_names(rows)
    extra_head = "".join(f" {n} ppl | {n} Δ% |" for n in names)
    lines = ["| method | bits | perplexity | Δ% vs float |" + extra_head + " linear MiB | total MiB | prefill tok/s "
             "| decode tok/s | calib s | quantize s |", "|---" * (10 + 2 * len(names)) + "|"]
    for r in rows:
        extra = "".join(f" {fmt(r['texts'][n]['ppl'])} | {_delta(r['texts'][n].get('delta_pct'))} |" for n in names)
        lines.append(f"| {r['method']} | {r['bits']} | {fmt(r['ppl'])} | {_delta(r.get('delta_pct'))} |{extra} "
                     f"{fmt(r['linear_MiB'], 1)} | {fmt(r['total_MiB'], 1)} | "
                     f"{fmt(r.get('prefill_tok_s'), 0)} | {fmt(r.get('decode_tok_s'), 1)} | "
                     f"{fmt(r.get('calib_s'), 1)} | {fmt(r.get('quant_s'), 1)} |")
    return "\n".join(lines)


def write_report(rows: list[dict], meta: dict, out_dir: str) -> str:
    """report.md with the table, the plots (rendered from the rows), the
    environment and the command; plots need matplotlib (skipped without)."""
    from . import plots

    figures = []
    try:
        figures += plots.plot_ppl_memory(rows, out_dir)
        figures += plots.plot_weights(rows, meta.get("plot_layer", "?"), out_dir)
    except ImportError as err:
        figures = []
        meta = dict(meta, plots=f"not drawn: {err}")
    md = [f"# {meta['model']}: quantization methods compared", "", _row_table(rows), ""]
    for f in figures:
        if f.endswith(".png"):
            stem = os.path.splitext(os.path.basename(f))[0]
            md += [f"![{stem}]({os.path.basename(f)})", ""]
    md += ["## How this was measured", "",
           f"- Protocol: {meta['protocol']}.", f"- Calibration: {meta['calibration']}.", f"- Speed: {meta['speed']}.",
           f"- Weight histograms: layer `{meta.get('plot_layer', '?')}`." if figures else f"- Plots: {meta.get('plots')}.",
           f"- Environment: {meta['environment']}.", f"- Command: `{meta['command']}`", ""]
    path = os.path.join(out_dir, "report.md")
    _atomic_write(path, "\n".join(md))
    return path


def write_outputs(rows: list[dict], meta: dict, out_dir: str) -> dict:
    """compare.md / compare.csv / compare.json in out_dir (each written atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"compare.{k}") for k in ("md", "csv", "json")}
    _atomic_write(paths["json"], json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    buf = io.StringIO()
    names = _text_names(rows)
    text_cols = [f"{k}_{n}" for n in names for k in ("ppl", "delta_pct")]
    w = csv.DictWriter(buf, fieldnames=COLUMNS + text_cols + ["protocol"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, **{f"{k}_{n}": r["texts"][n].get(k) for n in names for k in ("ppl", "delta_pct")}})
    _atomic_write(paths["csv"], buf.getvalue())
    md = [f"# {meta['model']}: methods compared", "", _row_table(rows), "",
          f"Protocol: {meta['protocol']}.", f"Calibration: {meta['calibration']}.",
          f"Speed: {meta['speed']}.", f"Environment: {meta['environment']}.", f"Command: `{meta['command']}`", ""]
    _atomic_write(paths["md"], "\n".join(md))
    return paths


def run_compare(model_loader: Callable, presets: list[Preset], *, out_dir: Optional[str] = None,
                seq_len: int = 2048, max_windows: Optional[int] = None, calib_samples: int = 128,
                calib_seq_len: int = 512, speed: bool = True, speed_prefill_tokens: int = 512,
                resume: bool = False, progress: bool = True,
                command: str = "", model_name: str = "", texts: Optional[dict[str, str]] = None) -> list[dict]:
    """Quantize + evaluate each preset on a fresh copy of the float model.
    ``model_loader()`` -> (model, tokenizer). Returns the rows (float first).

    ``texts``: name -> text file, other texts each model is also scored on
    (the same windows rule as the test file; ``row["texts"][name]`` holds
    ``ppl`` and ``delta_pct``): how a method calibrated on WikiText does on
    text of other kinds."""
    from .calibration import calibration_batches
    from . import plots
    from .data import default_eval_file

    eval_file = default_eval_file()

    base, tok = model_loader()
    base.eval()
    plot_layer = plots.pick_layer(base)
    float_w = plots.layer_weight(base, plot_layer)
    hist_range = (-1.05 * float(float_w.abs().max()), 1.05 * float(float_w.abs().max()))
    ids = tokenize_file(tok, eval_file)
    windows = (ids.numel() // seq_len) if max_windows is None else min(max_windows, ids.numel() // seq_len)
    protocol = (f"WikiText-2 raw test ({os.path.basename(eval_file)}), {windows} non-overlapping windows "
                f"x {seq_len} tokens{' (whole file)' if max_windows is None else ''}, fp32 logits")
    other = {}  # name -> (ids, windows)
    for name, path in (texts or {}).items():
        t_ids = tokenize_file(tok, path)
        t_win = t_ids.numel() // seq_len if max_windows is None else min(max_windows, t_ids.numel() // seq_len)
        if t_win < 1:
            raise ValueError(f"--text {name}={path}: {t_ids.numel()} tokens, fewer than one window of {seq_len}")
        other[name] = (t_ids, t_win)
        protocol += f"; {name}: {os.path.basename(path)}, {t_win} windows"
    meta = {"model": model_name, "protocol": protocol,
            "calibration": f"{calib_samples} x {calib_seq_len} tokens of WikiText-2 validation (wiki.valid.tokens)",
            "speed": f"prefill: one forward of {speed_prefill_tokens} tokens; decode: 32 greedy tokens after a "
                     "64-token prompt; "
                     f"batch 1, {torch.get_num_threads()} threads" if speed else "not measured",
            "environment": _environment(),
            "command": command, "plot_layer": plot_layer}
    done = {}
    if resume and out_dir and os.path.exists(os.path.join(out_dir, "compare.json")):
        with open(os.path.join(out_dir, "compare.json")) as fh:
            old = json.load(fh)
        done = {r["method"]: r for r in old.get("rows", []) if r.get("protocol") == protocol}
    calib = None
    rows: list[dict] = []
    for p in tqdm(presets, desc="methods", disable=not progress):
        if p.name in done:
            if p.method is None and not done[p.name].get("weight_hist"):  # a row from before the histograms
                done[p.name]["weight_hist"] = plots.weight_histogram(float_w, *hist_range)
            rows.append(done[p.name])
            continue
        model = base if p.method is None else copy.deepcopy(base)
        calib_s = quant_s = None
        if p.method is not None:
            needs_calib = p.method in ("smoothquant", "gptq", "awq") or p.options.get("act") == "static"
            if needs_calib and calib is None:  # one calibration set, shared by every method
                t0 = time.perf_counter()
                calib = calibration_batches(tok, n_samples=calib_samples, seq_len=calib_seq_len)
                calib_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            quantize(model, p.method, calib=calib if calib is not None else None, tokenizer=tok,
                     progress=progress, **p.options)
            quant_s = time.perf_counter() - t0
        res = perplexity(model, ids=ids, seq_len=seq_len, max_windows=windows, progress=progress)
        row_texts = {name: {"ppl": perplexity(model, ids=t_ids, seq_len=seq_len, max_windows=t_win,
                                              progress=progress).ppl}
                     for name, (t_ids, t_win) in other.items()}
        mem = model_memory(model)
        hist = plots.weight_histogram(plots.layer_weight(model, plot_layer), *hist_range)
        row = {"method": p.name, "bits": p.bits, "ppl": res.ppl, "tokens": res.tokens,
               "linear_MiB": mem["linear"] / 2**20, "total_MiB": mem["total"] / 2**20,
               "calib_s": calib_s, "quant_s": quant_s, "protocol": protocol,
               "options": {"method": p.method, **p.options}, "weight_hist": hist, "texts": row_texts}
        if speed:
            sp = throughput(model, ids, prefill_tokens=speed_prefill_tokens)
            row.update(prefill_tok_s=sp.prefill_tokens_per_s, decode_tok_s=sp.decode_tokens_per_s)
        rows.append(row)
        _set_deltas(rows)
        if out_dir:
            write_outputs(rows, meta, out_dir)
        del model
    _set_deltas(rows)
    if out_dir:
        write_outputs(rows, meta, out_dir)
        write_report(rows, meta, out_dir)
    return rows


def _set_deltas(rows: list[dict]) -> None:
    """Δ% of each row against the float row, on the test file and each other text (None until float is in)."""
    base = next((r for r in rows if r["method"] == "float"), None)

    def pct(ppl, ref):
        return None if ref is None else 100.0 * (ppl - ref) / ref

    for r in rows:
        own = r["method"] == "float" or base is None
        r["delta_pct"] = None if own else pct(r["ppl"], base["ppl"])
        for name, t in r.get("texts", {}).items():
            t["delta_pct"] = None if own else pct(t["ppl"], base["texts"][name]["ppl"])


def _environment() -> str:
    import platform

    import transformers

    from ._native import build_info

    info = build_info()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"llmeasyquant {info['version']}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{cpu} ({torch.get_num_threads()} threads, CPU kernels {info['cpu_isa_active']}), {gpu}, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}")


def format_table(rows: list[dict]) -> str:
    return _row_table(rows)
