"""Per-call cost of one QLinear at decode (M = 1) next to fp32 ``F.linear``
and ``nn.Linear`` on the same shape, and the op called directly
(``torch.ops.llmeasyquant.*`` on the held tensors): QLinear() minus the op is
what our Python layer adds per call (module call, buffer reads, wrappers);
``QLinear.bound_forward()`` (what the fast decoder calls) is the op with its
arguments bound once.

Shapes: SmolLM2-135M's 576 -> 1536 (gate/up projection of the default model)
and 64 -> 64 (kernels negligible: the fixed per-call cost). Weights hot in
cache (they are reused every call; the point is the per-call overhead, not
bandwidth). One thread. Each round times every case ``--calls`` times in a
row; rounds interleave the cases; the table gives min and median over rounds
(the min is the least disturbed by other jobs on a shared core).

    OMP_WAIT_POLICY=ACTIVE taskset -c 1 python benchmarks/bench_decode_call.py [--rounds 30]

Run it with PYTHONPATH at an older checkout to time that version's layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def cases(K: int, N: int) -> dict:
    from llmeasyquant.nn.qlinear import QLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False)
    q8 = QLinear.from_linear(lin, act="dynamic")
    q4 = QLinear.from_linear(lin, w_bits=4, w_group_size=64 if K % 64 == 0 else -1, act=None)
    x = torch.randn(1, 1, K)  # fresh random input, M = 1 (one decode token)
    W = lin.weight.detach()
    o = torch.ops.llmeasyquant
    s8, w_sum = q8.w_scale.float().reshape(-1), q8.w_sum
    s4 = q4.w_scale.float()
    # correctness before timing: the layer is the op on its held tensors
    assert torch.equal(q8(x), o.dynamic_quant_linear(x, q8.qweight, s8, w_sum, None, True))
    assert torch.equal(q4(x), o.weight_only_linear(x, q4.qweight, s4, None, 4, q4.w_group_size, None))
    return {
        "F.linear fp32": lambda: F.linear(x, W),
        "nn.Linear() fp32": lambda: lin(x),
        "op dynamic_quant_linear": lambda: o.dynamic_quant_linear(x, q8.qweight, s8, w_sum, None, True),
        "QLinear() W8A8 dynamic": lambda: q8(x),
        "QLinear.bound_forward() W8A8": (lambda f: lambda: f(x))(q8.bound_forward()),
        "op weight_only_linear": lambda: o.weight_only_linear(x, q4.qweight, s4, None, 4, q4.w_group_size, None),
        "QLinear() W4 g64": lambda: q4(x),
        "QLinear.bound_forward() W4 g64": (lambda f: lambda: f(x))(q4.bound_forward()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=300, help="calls per case per round")
    ap.add_argument("--shapes", default="576x1536,64x64", help="KxN list (in -> out features)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import llmeasyquant as lq

    print(f"llmeasyquant {lq.build_info()['version']} from {lq.__file__}; ISA tier in use "
          f"{lq.build_info()['cpu_isa_active']}; 1 thread; {args.rounds} rounds x {args.calls} calls")
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        cs = cases(K, N)
        res = {k: [] for k in cs}
        with torch.no_grad():
            for f in cs.values():
                for _ in range(50):
                    f()
            for _ in range(args.rounds):
                for k, f in cs.items():
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        f()
                    res[k].append((time.perf_counter() - t0) / args.calls * 1e6)
        print(f"\nK={K} -> N={N}, M=1\n| call | us min | us median | median vs F.linear |\n|---|---|---|---|")
        base = res["F.linear fp32"]
        for k, v in res.items():
            ratio = statistics.median(a / b for a, b in zip(v, base))
            print(f"| {k} | {min(v):.2f} | {statistics.median(v):.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
