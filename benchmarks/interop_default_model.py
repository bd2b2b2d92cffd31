"""Interop on the real default model: quantize SmolLM2-135M here, export it as
compressed-tensors, load the folder with plain transformers (the
compressed-tensors package installed) and compare with our model:
max |logit diff| on one window and WikiText-2 perplexity on the first windows.

GPTQ W4 g64 is asymmetric: transformers 5.24 + compressed-tensors 0.20.1 load
asymmetric pack-quantized folders only with ``CompressedTensorsConfig(
dequantize=True)`` (their default path mis-sizes packed zero-points on the
meta device), so that is how it is loaded here. SmoothQuant W8A8 (dynamic
per-token activations) loads on the default path, which fake-quantizes the
activations with compressed-tensors' own rounding rule.

Run:  python benchmarks/interop_default_model.py [--windows 4] [--calib-samples 32]
"""

from __future__ import annotations

import argparse
import datetime
import tempfile

import torch
import transformers

import llmeasyquant as lq
from llmeasyquant.bench import _cpu_name
from llmeasyquant.data import default_eval_file
from llmeasyquant.eval.perplexity import perplexity, tokenize_file
from llmeasyquant.models import load_default_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    _, tok = load_default_model()
    ids = tokenize_file(tok, default_eval_file())
    window = ids[: args.seq_len].unsqueeze(0)
    print(f"### Interop: compressed-tensors export of SmolLM2-135M read by transformers\n\n- date: "
          f"{datetime.date.today().isoformat()}; CPU: {_cpu_name()}, 2 threads, ISA {lq.build_info()['cpu_isa_active']}; "
          f"transformers {transformers.__version__}\n- perplexity: WikiText-2 raw test, first {args.windows} windows x "
          f"{args.seq_len} tokens, fp32; calibration {args.calib_samples} x 512 tokens of WikiText-2 validation\n"
          f"- command: `python benchmarks/interop_default_model.py --windows {args.windows} --calib-samples "
          f"{args.calib_samples}`\n")
    print("| model | ours ppl | transformers ppl | ppl diff | max abs logit diff (1 window) |\n|---|---|---|---|---|")
    for label, method, opts, tf_kw in (
            ("GPTQ W4 g64 (asymmetric)", "gptq", {}, "dequantize"),
            ("SmoothQuant W8A8 dynamic", "smoothquant", {}, None)):
        model, tok = load_default_model()
        lq.quantize(model, method, tokenizer=tok, progress=False, n_calib=args.calib_samples, **opts)
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/m"
            lq.save(model, out, tokenizer=tok, format="compressed-tensors")
            kw = {}
            if tf_kw == "dequantize":
                kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
            with torch.no_grad():
                diff = (theirs(window).logits - model(window).logits).abs().max().item()
            p_ours = perplexity(model, ids=ids, seq_len=args.seq_len, max_windows=args.windows, progress=False).ppl
            p_theirs = perplexity(theirs, ids=ids, seq_len=args.seq_len, max_windows=args.windows,
                                  progress=False).ppl
        print(f"| {label} | {p_ours:.4f} | {p_theirs:.4f} | {100 * (p_theirs - p_ours) / p_ours:+.3f} % | "
              f"{diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
