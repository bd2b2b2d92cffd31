"""The Walsh-Hadamard transform op (``ops.hadamard_transform``, CPU kernels)
vs the PyTorch fast transform (``hadamard.transform``) vs the dense product
``x @ Q.T`` (``Q = hadamard.matrix(n)``, fp32 BLAS) on the CPU: the online
rotation before a linear layer, at decode (1 row) and prefill sizes.

Each method is checked against the dense product before it is timed (fp32,
relative error); the methods are interleaved inside each round and the
median of the per-round medians is printed, with the CPU model and the ISA
tier beside every figure. ``--isas scalar,avx2`` times the op once per tier
(LLMEQ_CPU_ISA caps it in-process); the other two columns do not depend on it.

Run:  OMP_WAIT_POLICY=ACTIVE taskset -c 1 python benchmarks/bench_hadamard.py \\
          [--widths 576,1536,4096,14336] [--rows 1,16,512] [--threads 1] [--isas avx2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

import llmeasyquant as lq
from llmeasyquant import hadamard
from llmeasyquant.bench import _cpu_name


def _median_s(fn, x, budget_s: float, min_reps: int = 3) -> float:
    fn(x)  # warm-up (and the per-thread buffer)
    t0 = time.perf_counter()
    fn(x)
    est = max(time.perf_counter() - t0, 1e-7)
    reps = max(min_reps, min(2000, int(budget_s / est)))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(n: int, rows: int, isas: list[str], rounds: int, budget_s: float, dense_max_n: int) -> dict:
    g = torch.Generator().manual_seed(n + rows)
    x = torch.randn(rows, n, generator=g)
    had = hadamard.small_matrix(n)
    Q = hadamard.matrix(n) if n <= dense_max_n else None
    op = lambda t: lq.ops.hadamard_transform(t, had)  # noqa: E731
    methods = {"transform": (lambda t: hadamard.transform(t, had), None)}
    if Q is not None:
        methods["dense"] = (lambda t: t @ Q.T, None)
    for isa in isas:
        methods[f"op:{isa}"] = (op, isa)
    ref = x @ Q.T if Q is not None else None
    with torch.inference_mode():
        times = {k: [] for k in methods}
        for rnd in range(rounds):
            for name, (fn, isa) in methods.items():
                if isa is not None:  # the tier is read on every call: set it outside the timed region
                    os.environ["LLMEQ_CPU_ISA"] = isa
                    assert lq.build_info()["cpu_isa_active"] == isa, f"this CPU cannot run {isa}"
                if rnd == 0 and ref is not None:
                    rel = ((fn(x) - ref).norm() / ref.norm()).item()
                    assert rel < 1e-5, f"{name} wrong at n={n} rows={rows}: {rel:.3g}"
                times[name].append(_median_s(fn, x, budget_s))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="576,1536,4096,14336")
    p.add_argument("--rows", default="1,16,512")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--isas", default="", help="op tiers to time (default: the active one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.2, help="seconds per measurement (>= 3 runs)")
    p.add_argument("--dense-max-n", type=int, default=16384, help="skip the dense product above this width")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = os.environ.get("LLMEQ_CPU_ISA")
    info = lq.build_info()
    isas = [s for s in args.isas.split(",") if s] or [info["cpu_isa_active"]]
    cpu = _cpu_name()
    print(f"date {datetime.date.today().isoformat()}; CPU {cpu}; ISA detected {info['cpu_isa_detected']}; "
          f"threads {args.threads}; fp32 x; median of per-round medians ({args.rounds} rounds)")
    print("| n (m x p) | rows | CPU | ISA | op us | transform us | dense x @ Q.T us | op vs transform | op vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for n in (int(v) for v in args.widths.split(",")):
            m, pw = hadamard.factor(n)
            for rows in (int(r) for r in args.rows.split(",")):
                r = bench(n, rows, isas, args.rounds, args.budget, args.dense_max_n)
                tr, dense = r["transform"], r.get("dense")
                for isa in isas:
                    op = r[f"op:{isa}"]
                    d = f"{dense * 1e6:.1f}" if dense else "-"
                    dv = f"{dense / op:.1f}x" if dense else "-"
                    print(f"| {n} ({m} x {pw}) | {rows} | {cpu} | {isa} | {op * 1e6:.1f} | {tr * 1e6:.1f} | {d} | "
                          f"{tr / op:.1f}x | {dv} |", flush=True)
    finally:
        if env is None:
            os.environ.pop("LLMEQ_CPU_ISA", None)
        else:
            os.environ["LLMEQ_CPU_ISA"] = env


if __name__ == "__main__":
    main()
