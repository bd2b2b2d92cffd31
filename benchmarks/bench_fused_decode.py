"""Decode tokens/s of eval.fast_decode.FastDecoder with the plain glue (HF's
ops, op for op) and the fused glue ops, per model, in one process.

Usage: OMP_WAIT_POLICY=ACTIVE PYTHONPATH=python python benchmarks/bench_fused_decode.py [--threads 2]
       [--rounds 3] [--decode 64]
Batch 1, a 64-token prompt of wiki.test.raw, ``--decode`` steps timed after
two untimed ones; rounds interleave plain and fused for every model so host
drift hits both. Prints CPU model, ISA tier, threads and date beside the table.
"""

import argparse
import copy
import statistics
import time

import torch

import llmeasyquant as lq
from llmeasyquant.bench import _cpu_name
from llmeasyquant.data import default_eval_file
from llmeasyquant.eval import fast_decode
from llmeasyquant.eval.perplexity import tokenize_file
from llmeasyquant.models import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = lq.build_info()
    print(f"CPU: {_cpu_name()}; tier {info['cpu_isa_active']}; threads {args.threads}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    model, tok = load_model(args.model)
    model.eval()
    ids = tokenize_file(tok, default_eval_file()).reshape(-1)
    q = dict(tokenizer=tok, n_calib=8, progress=False)
    models = {"fp32": model,
              "W8A8 +w8 head": lq.quantize(copy.deepcopy(model), "smoothquant", lm_head="w8", **q),
              "W8A8": lq.quantize(copy.deepcopy(model), "smoothquant", **q),
              "W4 g64": lq.quantize(copy.deepcopy(model), "absmax", w_bits=4, w_group_size=64, act=None,
                                    progress=False)}
    prompt = ids[:64].reshape(1, -1)
    res = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, m in models.items():
                for fused in (False, True):
                    dec = fast_decode.FastDecoder(m, 1, 64 + args.decode + 3, fused=fused)
                    nxt = dec.forward(prompt).argmax(-1, keepdim=True)
                    for _ in range(2):
                        dec.forward(nxt)
                    t0 = time.perf_counter()
                    for _ in range(args.decode):
                        dec.forward(nxt)
                    res.setdefault((name, fused), []).append(args.decode / (time.perf_counter() - t0))
    print("| model | plain tok/s | fused tok/s | fused / plain |\n|---|---|---|---|")
    for name in models:
        p, f = res[(name, False)], res[(name, True)]
        print(f"| {name} | {statistics.median(p):.1f} ({min(p):.1f}-{max(p):.1f}) | {statistics.median(f):.1f} "
              f"({min(f):.1f}-{max(f):.1f}) | {statistics.median(f) / statistics.median(p):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
