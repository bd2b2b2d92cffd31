"""End to end on a GPU (issue 16 item 5): prefill and decode tokens/s of a
LLaMA-shaped model in bf16, W8A8 (dynamic per-token activations, int8
kernels) and W4A16 (group 128, the weight-only kernels: GEMV at M <= 8, the
panel kernel up to M = 256), eager, through ``llmeasyquant.eval.throughput``
(what ``llmeasyquant eval MODEL --speed`` prints).

Models (nothing is downloaded):
  llama-1b   random weights, TinyLlama-1.1B's shape (2048 hidden, 5632 MLP,
             22 layers, 32 heads / 4 KV heads, vocab 32000), built locally in
             bf16 on the GPU -- large enough that the GPU is not launch-bound
  tiny       a 2-layer toy of the same kind (CPU dry runs, tests)
  PATH       any local Hugging Face folder or our default model name

Quantization is round-to-nearest (absmax W8A8, zeropoint W4 g128): speed
does not depend on how the integers were chosen, and RTN takes seconds. Each
quantized model's next-token argmax on a random prompt is compared with
bf16's (agreement printed) before it is timed.

CUDA graphs (``--graphs``): the decode step replayed from a graph through
transformers' static cache + ``torch.compile(mode="reduce-overhead")``; a
failure is printed with its reason, never hidden.

Run:  python benchmarks/bench_e2e_cuda.py [--model llama-1b] [--batches 1,8]
          [--prefill 512] [--decode 128] [--graphs] [--out FILE.md]
      python benchmarks/bench_e2e_cuda.py --model tiny --device cpu --decode 4 --prefill 32   (dry run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

import llmeasyquant as lq
from llmeasyquant.bench import write_text_atomic
from llmeasyquant.eval import throughput

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
METHODS = {
    "bf16": None,
    "W8A8": ("absmax", dict(act="dynamic")),
    "W4A16": ("zeropoint", dict(w_bits=4, w_group_size=128, act=None)),
}


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b", help="llama-1b, tiny, or a local model folder / name")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--graphs", action="store_true", help="also time decode from CUDA graphs (static cache)")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        ap.error(f"unknown method(s) {sorted(unknown)}; choose from {sorted(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU (use --device cpu --model tiny for a dry run)")
    return args


def build(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    """The model, on ``device`` in ``dtype`` (random weights for llama-1b / tiny)."""
    import transformers as tf

    if name in ("llama-1b", "tiny"):
        torch.manual_seed(seed)
        cfg = tf.LlamaConfig(**(LLAMA_1B if name == "llama-1b" else TINY), tie_word_embeddings=False)
        with torch.device(device):
            model = tf.LlamaForCausalLM(cfg).to(dtype)
        return model.eval()
    from llmeasyquant.models import load_model

    model = load_model(name)
    return model.to(device=device, dtype=dtype).eval()


def agreement(model, ref_argmax, ids) -> float:
    with torch.no_grad():
        got = model(ids).logits.argmax(-1)
    return (got == ref_argmax).float().mean().item()


def graph_decode_tokens_per_s(model, ids, decode: int, batch: int) -> float:
    """Greedy decode from a static KV cache with the step compiled in
    "reduce-overhead" mode (CUDA graphs); tokens/s over ``decode`` tokens after
    a warm-up generation, prompt prefill excluded the same way as throughput()."""
    prompt = ids[: batch * 64].reshape(batch, 64).to(next(model.parameters()).device)
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0, attention_mask=torch.ones_like(prompt))
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    for n in (1, decode + 1):  # warm-up: compile + capture for both lengths
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    t1 = sorted(timed(1) for _ in range(3))[1]
    tn = sorted(timed(decode + 1) for _ in range(3))[1]
    return batch * decode / max(tn - t1, 1e-9)


def main(argv=None) -> int:
    args = _args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        where = f"{props.name}, {props.multi_processor_count} SMs"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    head = (f"bench_e2e_cuda: {args.model} ({str(dtype).replace('torch.', '')} float baseline) on {where}; "
            f"torch {torch.__version__}; llmeasyquant "
            f"{lq.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"command: {' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}")
    print(head, flush=True)
    gen = torch.Generator().manual_seed(1)
    vocab = (LLAMA_1B if args.model == "llama-1b" else TINY)["vocab_size"] if args.model in ("llama-1b", "tiny") \
        else None
    rows, ref_argmax, ids = [], None, None
    for name in args.methods.split(","):
        model = build(args.model, args.device, dtype)
        if ids is None:  # the same token ids for every method
            vocab = vocab or model.config.vocab_size
            ids = torch.randint(0, vocab, (max(batches) * max(args.prefill, 64) + 64,), generator=gen)
        probe = ids[:128].reshape(1, 128).to(dev)
        t0 = time.perf_counter()
        if METHODS[name] is not None:
            method, opts = METHODS[name]
            lq.quantize(model, method, progress=False, **opts)
        t_quant = time.perf_counter() - t0
        with torch.no_grad():
            if ref_argmax is None and name == "bf16":
                ref_argmax = model(probe).logits.argmax(-1)
            agree = agreement(model, ref_argmax, probe) if ref_argmax is not None else float("nan")
            for b in batches:
                sp = throughput(model, ids, prefill_tokens=args.prefill, decode_tokens=args.decode, reps=args.reps,
                                batch=b)
                row = {"method": name, "batch": b, "prefill_tok_s": sp.prefill_tokens_per_s,
                       "decode_tok_s": sp.decode_tokens_per_s, "agree": agree, "quantize_s": t_quant}
                if args.graphs and dev.type == "cuda":
                    try:
                        row["decode_graph_tok_s"] = graph_decode_tokens_per_s(model, ids, args.decode, b)
                    except Exception as e:  # printed, never hidden: the table says why it is missing
                        row["decode_graph_tok_s"] = None
                        row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["batch"]: r for r in rows if r["method"] == "bf16"}
    lines = [head, "", "| method | batch | prefill tok/s | decode tok/s | prefill / bf16 | decode / bf16 | "
             "decode (graphs) tok/s | argmax agreement with bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["batch"])
        ratio = (lambda k: f"{r[k] / b[k]:.2f}x") if b else (lambda k: "n/a")
        graph = r.get("decode_graph_tok_s")
        gtxt = f"{graph:.1f}" if graph else (r.get("graph_error", "not run"))
        lines.append(f"| {r['method']} | {r['batch']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{ratio('prefill_tok_s')} | {ratio('decode_tok_s')} | {gtxt} | {100 * r['agree']:.1f} % |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
