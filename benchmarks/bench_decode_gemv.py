"""Decode matrix-vector products (M = 1) with the weights streamed from DRAM:
GB/s of weight bytes per kernel next to a plain float sum over as many bytes
(what this machine's memory gives two threads), in one process.

Why: at decode every weight byte is read once per token, so a kernel's speed
is its streaming rate; a 150 MB weight (far beyond any cache) per call makes
that rate the measurement, and the sum is the ceiling to compare it with
(issue 15's bar: weight-only decode >= 60 % of the measured bandwidth).

    OMP_WAIT_POLICY=ACTIVE PYTHONPATH=python python benchmarks/bench_decode_gemv.py [--threads 2] [--rounds 5]

Rounds interleave the cases; the table gives the median and range over
rounds. Prints CPU model, ISA tier, threads and date beside the table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def cases(K: int, mbytes: int) -> dict:
    from llmeasyquant import ops, quant_format

    g = torch.Generator().manual_seed(K)
    x = torch.randn(1, K, generator=g)
    out = {}
    n8 = mbytes * 10**6 // K
    q8 = torch.randint(-127, 128, (n8, K), dtype=torch.int8, generator=g)
    s8 = torch.rand(n8, generator=g) + 0.5
    sums8 = q8.sum(1, dtype=torch.int32)
    out["W8A8 dynamic (int8 GEMV)"] = (n8 * K, lambda: ops.dynamic_quant_linear(x, q8, s8, sums8, None, True))
    s8g = s8.view(-1, 1)
    out["W8A16 weight-only"] = (n8 * K, lambda: ops.weight_only_linear(x, q8, s8g, None, 8, -1, None))
    n4 = 2 * mbytes * 10**6 // K
    q4 = quant_format.pack_bits(torch.randint(-8, 8, (n4, K), dtype=torch.int8, generator=g), 4)
    s4 = torch.rand(n4, K // 64, generator=g) + 0.5
    out["W4A16 g64 weight-only"] = (q4.numel(), lambda: ops.weight_only_linear(x, q4, s4, None, 4, 64, None))
    if ops.w4a8_fast(K, 64):
        out["W4A8 g64 (int8 kernel)"] = (q4.numel(), lambda: ops.w4a8_linear(x, q4, s4, None, 64, None))
    f = torch.randn(mbytes * 10**6 // 4, generator=g)
    out["float sum (ceiling)"] = (f.numel() * 4, lambda: f.sum())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mbytes", type=int, default=150, help="weight bytes per case (MB, far beyond the caches)")
    ap.add_argument("--k", default="576,1536", help="in_features to test (SmolLM2-135M: 576, 1536)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import llmeasyquant as lq
    from llmeasyquant.bench import _cpu_name

    info = lq.build_info()
    print(f"CPU: {_cpu_name()}; tier {info['cpu_isa_active']}; threads {args.threads}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    for K in (int(k) for k in args.k.split(",")):
        cs = cases(K, args.mbytes)
        res = {name: [] for name in cs}
        with torch.no_grad():
            for name, (_, fn) in cs.items():
                fn()
            for _ in range(args.rounds):
                for name, (nbytes, fn) in cs.items():
                    t0 = time.perf_counter()
                    fn()
                    res[name].append(nbytes / (time.perf_counter() - t0) / 1e9)
        ceiling = statistics.median(res["float sum (ceiling)"])
        print(f"\nK={K}, M=1, {args.mbytes} MB of weights per call\n"
              "| kernel | GB/s median (range) | vs float sum |\n|---|---|---|")
        for name, v in res.items():
            print(f"| {name} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | "
                  f"{statistics.median(v) / ceiling:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
