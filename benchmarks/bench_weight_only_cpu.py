"""Weight-only QLinear (W8A16 per-channel, W4A16 group-wise) vs fp32 F.linear
on the CPU, one process, interleaved rounds (protocol: PERF.md).

Every layer is checked against float math on the weight it really holds
before it is timed.  Weight copies rotate so their total exceeds 3x the LLC
("cold" weights, what decode sees).  The ISA tier is whatever the library
picks (cap it with LLMEQ_CPU_ISA=scalar|avx2|avx512_vnni|avx512_amx).

Run:  OMP_WAIT_POLICY=ACTIVE python benchmarks/bench_weight_only_cpu.py \\
          [--shapes 576x1536,1536x576,4096x4096] [--tokens 1,16,128,256,512] [--group 64]
          [--crossover]
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
import torch.nn.functional as F

import llmeasyquant as lq
from llmeasyquant.bench import LLC_BYTES, _cpu_name, cold_copies, interleaved_ratios, seeded_linear


def _dequant_blas(layer: lq.QLinear):
    """What the op does above its crossover: dequantize the weight, then BLAS."""
    return lambda t: F.linear(t, layer.dequantize(), layer.bias)


def bench(N: int, K: int, M: int, group: int, reps: int, rounds: int, max_m8: int, max_m4: int,
          crossover: bool = False) -> dict:
    g = torch.Generator().manual_seed(N * 31 + K)
    x = torch.randn(M, K, generator=g)

    def linear():
        return seeded_linear(N, K, g)

    methods = {"fp32": (lambda: (lambda l: (lambda t: F.linear(t, l.weight, l.bias)))(linear()), 4 * N * K)}
    if M <= max_m8:
        methods["W8A16"] = (lambda: lq.QLinear.from_linear(linear(), act=None), N * K)
    if M <= max_m4:
        methods[f"W4A16 g{group}"] = (lambda: lq.QLinear.from_linear(
            linear(), act=None, w_bits=4, w_group_size=group), N * K // 2)
        methods[f"W4A16 g{group} zp"] = (lambda: lq.QLinear.from_linear(
            linear(), act=None, w_bits=4, w_group_size=group, w_symmetric=False), N * K // 2)
    if crossover:  # both routes of the op at every M, to place its crossover per ISA tier
        methods["W8A16 deq+BLAS"] = (lambda: _dequant_blas(lq.QLinear.from_linear(linear(), act=None)), N * K)
        methods[f"W4A16 g{group} deq+BLAS"] = (lambda: _dequant_blas(lq.QLinear.from_linear(
            linear(), act=None, w_bits=4, w_group_size=group)), N * K // 2)
    layers = {}
    with torch.inference_mode():
        for name, (make, nbytes) in methods.items():
            layers[name] = [make() for _ in range(cold_copies(nbytes))]
            layer = layers[name][0]
            if isinstance(layer, lq.QLinear):
                y = layer(x)
                check = F.linear(x, layer.dequantize(), layer.bias)
                rel = ((y - check).norm() / check.norm()).item()
                assert rel < 1e-5, f"{name} wrong at {N}x{K} M={M}: {rel:.3g}"
        return interleaved_ratios(layers, x, reps, rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="576x1536,1536x576,4096x4096", help="N x K, comma-separated")
    p.add_argument("--tokens", default="1,16,128,256,512")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--crossover", action="store_true",
                   help="also time dequantize + BLAS (the op's route above its crossover M) at every M")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = lq.build_info()
    print(f"date {datetime.date.today().isoformat()}; CPU {_cpu_name()}; ISA {info['cpu_isa_active']} "
          f"(detected {info['cpu_isa_detected']}); threads {args.threads}; cold weights "
          f"(copies > 3x {LLC_BYTES >> 20} MiB LLC); median of {args.reps} runs x {args.rounds} rounds "
          f"vs fp32 = median of the per-round ratios [min-max]")
    # the direct kernel's crossover (register_cpu.cpp): 512 tokens 8-bit, 256 4-bit
    print("| N x K | M | fp32 ms | method | ms | vs fp32 [spread] |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        for M in (int(t) for t in args.tokens.split(",")):
            r = bench(N, K, M, args.group, args.reps if M < 256 else max(10, args.reps // 5), args.rounds,
                      10**9 if args.crossover else 512, 10**9 if args.crossover else 256, args.crossover)
            f, _ = r.pop("fp32")
            for name, (t, ratios) in r.items():
                print(f"| {N}x{K} | {M} | {f * 1e3:.3f} | {name} | {t * 1e3:.3f} | "
                      f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |", flush=True)


if __name__ == "__main__":
    main()
