"""Out-of-domain perplexity (issue 20): each preset quantized at its method's
own defaults (calibration from WikiText-2 validation, or the model's own text
with ``--calib generated``), scored on WikiText-2 raw test and on the texts
``benchmarks/prepare_ood_texts.py`` builds; one JSON line per model, then a
table of Δ% vs float and each increase as a multiple of RTN's.

    python benchmarks/prepare_ood_texts.py --out /work/ood-texts
    python benchmarks/ood_perplexity.py --texts /work/ood-texts --out ood.jsonl \
        --presets float,rtn-w4-g64,gptq-w4-g64,awq-w4-g64,gptq-w4-g64-rot
    python benchmarks/ood_perplexity.py --texts /work/ood-texts --out ood.jsonl --presets gptq-w4-g64 \
        --calib generated --tag generated

Rows already in ``--out`` (same preset, tag and windows) are kept, not rerun:
a stopped run resumes. ``llmeasyquant compare --text NAME=FILE`` prints the
same columns, with one shared calibration set for every method instead of
each method's default.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

TEXTS = ("kjv.txt", "debian-reference.txt", "licenses.txt")


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["preset"] == "float"), None)
    rtn = next((r for r in rows if r["preset"] == "rtn-w4-g64" and not r["tag"]), None)
    if base is None:
        return "(no float row yet)"
    names = list(base["ppl"])
    lines = ["| model | " + " | ".join(f"{n}: ppl (Δ%, × RTN's Δ)" for n in names) + " | quantize s |",
             "|---" * (len(names) + 2) + "|"]
    for r in rows:
        cells = []
        for n in names:
            d = 100 * (r["ppl"][n] - base["ppl"][n]) / base["ppl"][n]
            if r is base:
                cells.append(f"{r['ppl'][n]:.3f}")
            elif rtn is None:
                cells.append(f"{r['ppl'][n]:.3f} ({d:+.2f})")
            else:
                d_rtn = 100 * (rtn["ppl"][n] - base["ppl"][n]) / base["ppl"][n]
                cells.append(f"{r['ppl'][n]:.3f} ({d:+.2f}, {d / d_rtn:.2f}x)")
        label = r["preset"] + (f" [{r['tag']}]" if r["tag"] else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['quant_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", required=True, help="folder written by prepare_ood_texts.py")
    ap.add_argument("--out", required=True, help="JSON lines, appended (rows already there are kept)")
    ap.add_argument("--presets", default="float,rtn-w4-g64,gptq-w4-g64,awq-w4-g64,gptq-w4-g64-rot")
    ap.add_argument("--calib", default=None, help="calib= for every method (a file, or 'generated')")
    ap.add_argument("--tag", default="", help="label of these rows (e.g. the calibration)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra method option, read as `llmeasyquant quantize --option` reads it")
    ap.add_argument("--windows", type=int, default=16, help="windows of 2048 tokens per text (default 16)")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)

    import llmeasyquant as lq
    from llmeasyquant.bench import _cpu_name
    from llmeasyquant.cli import method_options
    from llmeasyquant.compare import PRESETS
    from llmeasyquant.data import default_eval_file
    from llmeasyquant.eval.perplexity import perplexity, tokenize_file
    from llmeasyquant.models import load_model

    files = {"wikitext": default_eval_file(), **{t.split(".")[0]: os.path.join(args.texts, t) for t in TEXTS}}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"missing texts: {missing} (run benchmarks/prepare_ood_texts.py --out {args.texts})")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown presets {unknown}")
    extra = method_options(args.option)
    done = []
    if os.path.exists(args.out):
        with open(args.out) as fh:
            done = [json.loads(ln) for ln in fh if ln.strip()]
    model, tok = load_model(args.model)
    model.eval()
    ids = {n: tokenize_file(tok, p) for n, p in files.items()}
    for name in presets:
        if any(r["preset"] == name and r["tag"] == args.tag and r["windows"] == args.windows for r in done):
            continue
        p = PRESETS[name]
        m = model if p.method is None else copy.deepcopy(model)
        t0 = time.perf_counter()
        if p.method is not None:
            lq.quantize(m, p.method, calib=args.calib, tokenizer=tok, **{**p.options, **extra})
        quant_s = time.perf_counter() - t0
        ppl = {n: perplexity(m, ids=v, max_windows=args.windows).ppl for n, v in ids.items()}
        row = {"preset": name, "tag": args.tag, "options": extra, "calib": args.calib, "windows": args.windows,
               "ppl": ppl, "quant_s": quant_s, "cpu": _cpu_name(),
               "isa": lq.build_info()["cpu_isa_active"], "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M %Z")}
        done.append(row)
        with open(args.out, "a") as fh:  # one whole line per model: a stop loses at most the model in hand
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        del m
    print(table([r for r in done if r["windows"] == args.windows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
