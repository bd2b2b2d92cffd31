"""ONNX export of the real default model (SmolLM2-135M), checked in ONNX
Runtime: file sizes (float export vs quantized), max logit difference against
our PyTorch model, and perplexity through ONNX Runtime vs through PyTorch on
the first windows of WikiText-2 raw test. Writes a Markdown section.

Run:  python benchmarks/onnx_real.py [--windows 4] [--out docs/results/onnx.md]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import torch

import llmeasyquant as lq
from llmeasyquant.eval import perplexity
from llmeasyquant.eval.perplexity import tokenize_file
from llmeasyquant.models import load_model
from llmeasyquant.onnx_export import export_onnx, ort_session


def ort_perplexity(sess, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    total, count = 0.0, 0
    for w in range(windows):
        window = ids[w * seq_len: (w + 1) * seq_len].unsqueeze(0)
        logits = torch.from_numpy(sess.run(None, {"input_ids": window.numpy()})[0]).float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        total -= logp.gather(1, window[0, 1:].unsqueeze(1)).sum().item()
        count += seq_len - 1
    return math.exp(total / count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, tok = load_model("smollm2-135m")
    ids = tokenize_file(tok, lq.data.DEFAULT_EVAL_FILE)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, method, opts in (("float", None, {}), ("W8A8 dynamic (SmoothQuant)", "smoothquant", {}),
                                   ("W4 g64 asym (RTN)", "zeropoint", {"w_bits": 4, "w_group_size": 64, "act": None})):
            model, _ = load_model("smollm2-135m") if method else (base, tok)
            if method:
                calib = None
                if method == "smoothquant":
                    from llmeasyquant.calibration import calibration_batches

                    calib = calibration_batches(tok, n_samples=32, seq_len=512)
                lq.quantize(model, method, calib=calib, tokenizer=tok, progress=False, **opts)
            path = os.path.join(d, "m.onnx")
            t0 = time.perf_counter()
            export_onnx(model, path)
            t_export = time.perf_counter() - t0
            sess = ort_session(path)
            probe = ids[: args.seq_len].unsqueeze(0)
            with torch.no_grad():
                ref = model(probe).logits.numpy()
            diff = float(np.abs(sess.run(None, {"input_ids": probe.numpy()})[0] - ref).max())
            p_ort = ort_perplexity(sess, ids, args.seq_len, args.windows)
            p_pt = perplexity(model, ids=ids, seq_len=args.seq_len, max_windows=args.windows, progress=False).ppl
            rows.append((name, os.path.getsize(path) / 2**20, t_export, diff, float(np.abs(ref).max()), p_pt, p_ort))
            print(rows[-1], flush=True)
            del sess
    lines = ["| model | ONNX file MiB | export s | max abs logit diff (ORT vs PyTorch, 2048 tokens) | max abs logit "
             "| ppl PyTorch | ppl ONNX Runtime | Δ |", "|---|---|---|---|---|---|---|---|"]
    for n, mib, te, diff, mx, pp, po in rows:
        lines.append(f"| {n} | {mib:.1f} | {te:.0f} | {diff:.2e} | {mx:.1f} | {pp:.3f} | {po:.3f} | "
                     f"{100 * (po - pp) / pp:+.4f} % |")
    lines += ["", f"Protocol: first {args.windows} windows x {args.seq_len} tokens of WikiText-2 raw test; ONNX opset "
              f"21, dynamic batch/sequence, ONNX Runtime {__import__('onnxruntime').__version__} CPU, graph "
              f"optimizations BASIC (see llmeasyquant.onnx_export.ort_session); torch {torch.__version__}; "
              f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/onnx_real.py --windows {args.windows}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
