"""W4A8 QLinear on its int8 kernel vs the simulated W4A8 path it replaced,
W4A16 weight-only, W8A8 dynamic and fp32 F.linear, on the CPU; one process,
interleaved rounds (protocol: PERF.md).

W4A8 = 4-bit group-wise weights (zero-points) x per-token symmetric 8-bit
activations (ZeroQuant / rotated GPTQ W4A8). "simulated" is the same layer
through quantize -> dequantize -> weight_only_linear (what QLinear runs for
W4A8 where the kernel is not compiled, and ran everywhere before it). Every
layer is checked before it is timed: W4A8 bit for bit against
_reference.w4a8_linear, the others against float math on their own weights.
On AVX-512 VNNI CPUs QLinear runs W4A8 and W8A8 from its pre-packed weight
copies (llmeasyquant.cpu_pack).
Weight copies rotate past 3x the LLC (cold weights). The ISA tier is what the
library picks (cap it with LLMEQ_CPU_ISA=scalar|avx2|avx512_vnni|avx512_amx).

Run:  OMP_WAIT_POLICY=ACTIVE python benchmarks/bench_w4a8_cpu.py \\
          [--shapes 576x1536,1536x576,4096x4096] [--tokens 1,16,128,512] [--group 64] [--threads 2]

``--e2e`` (run it with OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=10000000, as
bench_e2e_cpu.py does: a passive pool pays a thread wake-up per op): instead, the default model end to end (fp32, W4A8 ZeroQuant RTN g64
on the kernel, the same model simulated, W4A16 RTN g64, W8A8 RTN dynamic;
on AVX-512 VNNI CPUs also W4A8 and W8A8 with the pre-packed weight copies
turned off, "canonical layout"): perplexity on
``--windows`` windows of WikiText-2 test and prefill / decode tokens/s
(``eval.throughput``: ``--prefill`` tokens, ``--decode`` greedy tokens,
batch ``--batch``), rounds interleaved.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics

import torch
import torch.nn.functional as F

import llmeasyquant as lq
from llmeasyquant import _fallback
from llmeasyquant.bench import LLC_BYTES, _cpu_name, cold_copies, interleaved_ratios, seeded_linear


def _simulated(layer: lq.QLinear) -> lq.QLinear:
    layer.w4a8 = False  # the quantize -> dequantize -> weight-only route
    return layer


def bench(N: int, K: int, M: int, group: int, reps: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(N * 31 + K)
    x = torch.randn(M, K, generator=g)

    def linear():
        return seeded_linear(N, K, g)

    w4 = dict(w_bits=4, w_group_size=group, w_symmetric=False)
    methods = {
        "fp32": (lambda: (lambda l: (lambda t: F.linear(t, l.weight, l.bias)))(linear()), 4 * N * K),
        f"W4A8 g{group} int8 kernel": (lambda: lq.QLinear.from_linear(linear(), act="dynamic", **w4), N * K // 2),
        f"W4A8 g{group} simulated": (lambda: _simulated(lq.QLinear.from_linear(linear(), act="dynamic", **w4)),
                                     N * K // 2),
        f"W4A16 g{group}": (lambda: lq.QLinear.from_linear(linear(), act=None, **w4), N * K // 2),
        "W8A8 dynamic": (lambda: lq.QLinear.from_linear(linear()), N * K),
    }
    layers = {}
    with torch.inference_mode():
        for name, (make, nbytes) in methods.items():
            layers[name] = [make() for _ in range(cold_copies(nbytes))]
            layer = layers[name][0]
            if not isinstance(layer, lq.QLinear):
                continue
            y = layer(x)
            if layer.w4a8:
                want = _fallback.w4a8_linear(x, layer.qweight, layer.w_scale, layer.w_zero, group, layer.bias)
                assert torch.equal(y, want), f"{name} differs from its definition at {N}x{K} M={M}"
            else:
                xq = x
                if layer.act is not None:
                    qx, sx, zx = lq.ops.quantize(x, 8, layer.act_symmetric, -1)
                    xq = lq.ops.dequantize(qx, sx, zx, 8, -1, K, torch.float32)
                check = F.linear(xq, layer.dequantize(), layer.bias)
                rel = ((y - check).norm() / check.norm()).item()
                assert rel < 1e-5, f"{name} wrong at {N}x{K} M={M}: {rel:.3g}"
        return interleaved_ratios(layers, x, reps, rounds)


def e2e(args) -> None:
    import copy
    import time

    from llmeasyquant.data import default_eval_file
    from llmeasyquant.eval import throughput
    from llmeasyquant.eval.perplexity import perplexity, tokenize_file
    from llmeasyquant.models import load_model

    model, tok = load_model("smollm2-135m")
    model.eval()
    ids = tokenize_file(tok, default_eval_file()).reshape(-1)
    w4 = dict(w_bits=4, w_group_size=args.group, progress=False)
    ours = {"fp32": model, "W4A8 kernel": lq.quantize(copy.deepcopy(model), "zeroquant", **w4)}
    sim = copy.deepcopy(ours["W4A8 kernel"])
    for m in sim.modules():
        if isinstance(m, lq.QLinear):
            _simulated(m)
    ours["W4A8 simulated"] = sim
    ours["W4A16"] = lq.quantize(copy.deepcopy(model), "absmax", act=None, **w4)
    ours["W8A8"] = lq.quantize(copy.deepcopy(model), "absmax", act="dynamic", w_bits=8, progress=False)
    if lq.ops.int8_prepacked_fast():  # the same models on the canonical-layout kernels: the pre-packing gain
        for name in ("W4A8 kernel", "W8A8"):
            canon = copy.deepcopy(ours[name])
            for m in canon.modules():
                if isinstance(m, lq.QLinear):
                    m.prepack_cpu_weights = False
            ours[f"{name} (canonical layout)"] = canon
    took = sum(isinstance(m, lq.QLinear) and m.w4a8 for m in ours["W4A8 kernel"].modules())
    print(f"W4A8: {ours['W4A8 kernel'].llmeq_config.describe()}; {took} layers on the W4A8 kernel")
    if args.windows > 0:
        ppl = {k: perplexity(m, ids=ids, seq_len=2048, max_windows=args.windows, progress=False).ppl
               for k, m in ours.items()}
        print("perplexity (" + f"{args.windows} x 2048 tokens of wiki.test): "
              + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()), flush=True)
    rows = {k: {"prefill": [], "decode": []} for k in ours}
    names = list(ours)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(0.5)
            sp = throughput(ours[name], ids, prefill_tokens=args.prefill, decode_tokens=args.decode, reps=1,
                            batch=args.batch, warmup=r == 0)
            rows[name]["prefill"].append(sp.prefill_tokens_per_s)
            rows[name]["decode"].append(sp.decode_tokens_per_s)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"| model | prefill tok/s ({args.prefill} tokens, batch {args.batch}) | decode tok/s ({args.decode}) | "
          "prefill vs fp32 | decode vs fp32 |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        vs = [statistics.median(a / b for a, b in zip(row[w], rows["fp32"][w])) for w in ("prefill", "decode")]
        print(f"| {name} | {statistics.median(row['prefill']):.1f} [{min(row['prefill']):.1f}-"
              f"{max(row['prefill']):.1f}] | {statistics.median(row['decode']):.1f} [{min(row['decode']):.1f}-"
              f"{max(row['decode']):.1f}] | {vs[0]:.2f}x | {vs[1]:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="576x1536,1536x576,4096x4096", help="N x K, comma-separated")
    p.add_argument("--tokens", default="1,16,128,512")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--e2e", action="store_true", help="the default model end to end instead of single layers")
    p.add_argument("--windows", type=int, default=2, help="--e2e: perplexity windows (x 2048 tokens)")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = lq.build_info()
    if args.e2e:
        print(f"date {datetime.date.today().isoformat()}; CPU {_cpu_name()}; ISA {info['cpu_isa_active']} "
              f"(detected {info['cpu_isa_detected']}); threads {args.threads}; {args.rounds} rounds, median "
              f"[min-max]; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        return e2e(args)
    print(f"date {datetime.date.today().isoformat()}; CPU {_cpu_name()}; ISA {info['cpu_isa_active']} "
          f"(detected {info['cpu_isa_detected']}); threads {args.threads}; cold weights "
          f"(copies > 3x {LLC_BYTES >> 20} MiB LLC); median of {args.reps} runs x {args.rounds} rounds; "
          f"vs fp32 = median of the per-round ratios [min-max]")
    print("| N x K | M | fp32 ms | method | ms | vs fp32 [spread] |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        for M in (int(t) for t in args.tokens.split(",")):
            r = bench(N, K, M, args.group, args.reps if M < 256 else max(5, args.reps // 5), args.rounds)
            f, _ = r.pop("fp32")
            for name, (t, ratios) in r.items():
                print(f"| {N}x{K} | {M} | {f * 1e3:.3f} | {name} | {t * 1e3:.3f} | "
                      f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |", flush=True)


if __name__ == "__main__":
    main()
