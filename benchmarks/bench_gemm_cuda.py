"""CUDA GEMM benchmark (issue 3, PERF.md): our kernels vs bf16 cuBLAS and
torch._int_mm in the same run, on LLaMA-7B layer shapes.

Per (N, K, M), bf16 activations in and out, quantization included where the
method quantizes:
  bf16        F.linear (cuBLAS), the baseline of every ratio
  int_mm+q    per-token quantize in PyTorch + torch._int_mm + scale epilogue in PyTorch
  W8A8        llmeasyquant dynamic_quant_linear (quantize pre-pass + mma/dp4a GEMM, fused epilogue)
  W8A8-mma    the same with LLMEQ_CUDA_GEMM=mma (M <= 8 only: dp4a vs mma)
  W8A16       llmeasyquant weight_only_linear, 8-bit per-channel weights
  W4A16       llmeasyquant weight_only_linear, 4-bit g=128 weights (auto path)
  W4A16-mma   the same forced onto the tensor-core kernel (LLMEQ_CUDA_WO=mma)
  W4A16-panel the same weights on the panel kernel (gemm_w4_panel.cu, weights
              re-laid out once by llmeasyquant.panel.pack; what QLinear runs
              on CUDA for panel.MIN_M <= M <= panel.MAX_M), every M
and the quantize kernel's bandwidth on a 64 MiB bf16 activation.

Weights are rotated over enough copies to exceed the L2 cache; times are the
median over CUDA-event-timed batches of 10 back-to-back calls (device time
per call; no CUDA graphs).
Each method is checked against bf16 before it is timed.

Run:  python benchmarks/bench_gemm_cuda.py [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import llmeasyquant as lq
from llmeasyquant.bench import write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import LLAMA_7B, TOKENS  # noqa: E402

DEV = "cuda"


def _copies(nbytes: int, l2: int) -> int:
    return max(2, min(16, -(-3 * l2 // max(nbytes, 1))))


def _time(fn, args_list, batches: int = 12, inner: int = 10, warmup: int = 10) -> float:
    """Median microseconds per call over `batches` event-timed batches of
    `inner` back-to-back calls (>= 100 calls), cycling through the rotated
    argument sets. Back-to-back calls keep the GPU queue fed, so this is
    device time per call; host dispatch overhead is hidden unless it exceeds it."""
    n = len(args_list)
    for i in range(warmup):
        fn(*args_list[i % n])
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for b in range(batches):
        start.record()
        for i in range(inner):
            fn(*args_list[(b * inner + i) % n])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def _time_graph(fn, args_list, batches: int = 12, inner: int = 10) -> float:
    """Like _time, but the `inner` calls are captured once in a CUDA graph and
    replayed: device time without any host dispatch cost (what decode loops
    with CUDA graphs see)."""
    n = len(args_list)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(*args_list[i % n])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fn(*args_list[i % n])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(batches):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _int_mm_path(x, w_t, w_scale):
    s = x.abs().amax(-1, keepdim=True).float() / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(x.float() / s).clamp(-128, 127).to(torch.int8)
    acc = torch._int_mm(q, w_t)
    return (acc.float() * s * w_scale).to(x.dtype)


def bench_shape(N, K, M, l2, quick):
    g = torch.Generator(device=DEV).manual_seed(N * 31 + K * 7 + M)
    w = torch.randn(N, K, device=DEV, generator=g, dtype=torch.bfloat16) / K**0.5
    x = torch.randn(M, K, device=DEV, generator=g, dtype=torch.bfloat16)
    ref = F.linear(x, w)
    row = {"N": N, "K": K, "M": M}
    n_bf = _copies(N * K * 2, l2)
    n_i8 = _copies(N * K, l2)
    ws = [w.clone() for _ in range(n_bf)]
    row["bf16"] = _time(lambda x, w: F.linear(x, w), [(x, wi) for wi in ws])
    row["bf16-graph"] = _time_graph(lambda x, w: F.linear(x, w), [(x, wi) for wi in ws])
    del ws
    qw, s, _ = lq.ops.quantize(w, 8, True, -1)
    w_sum = lq.ops.weight_row_sums(qw)
    s1 = s.view(-1)
    errs = {}
    out = lq.ops.dynamic_quant_linear(x, qw, s1, w_sum, None, True)
    errs["W8A8"] = _rel_err(out, ref)
    q8 = [(x, qw.clone(), s1, w_sum) for _ in range(n_i8)]
    row["W8A8"] = _time(lambda x, q, s, ws_: lq.ops.dynamic_quant_linear(x, q, s, ws_, None, True), q8)
    row["W8A8-graph"] = _time_graph(lambda x, q, s, ws_: lq.ops.dynamic_quant_linear(x, q, s, ws_, None, True), q8)
    if M <= 8:
        os.environ["LLMEQ_CUDA_GEMM"] = "mma"
        row["W8A8-mma"] = _time(lambda x, q, s, ws_: lq.ops.dynamic_quant_linear(x, q, s, ws_, None, True), q8)
        del os.environ["LLMEQ_CUDA_GEMM"]
    try:
        wt = [(x, q.t(), s1.view(1, -1)) for (_, q, _, _) in q8]  # [K, N] column-major B for _int_mm
        out = _int_mm_path(x, wt[0][1], wt[0][2])
        errs["int_mm+q"] = _rel_err(out, ref)
        row["int_mm+q"] = _time(_int_mm_path, wt)
    except RuntimeError as e:  # _int_mm has shape limits (e.g. M > 16 on some versions)
        row["int_mm+q"] = None
        errs["int_mm+q"] = str(e).splitlines()[0][:60]
    del q8
    for name, bits, gs, path in (("W8A16", 8, -1, "auto"), ("W4A16", 4, 128, "auto"), ("W4A16-mma", 4, 128, "mma")):
        os.environ["LLMEQ_CUDA_WO"] = path
        qwb, sb, zb = lq.ops.quantize(w, bits, True, gs)
        out = lq.ops.weight_only_linear(x, qwb, sb, None, bits, gs, None)
        errs[name] = _rel_err(out, ref)
        sets = [(x, qwb.clone(), sb) for _ in range(_copies(qwb.numel(), l2))]
        fn = lambda x, q, s_, b=bits, gg=gs: lq.ops.weight_only_linear(x, q, s_, None, b, gg, None)  # noqa: E731
        row[name] = _time(fn, sets)
        if name == "W4A16":
            row["W4A16-graph"] = _time_graph(fn, sets)
        del sets
        del os.environ["LLMEQ_CUDA_WO"]
    from llmeasyquant import panel

    qwb, sb, _ = lq.ops.quantize(w, 4, True, 128)
    pk = panel.pack(qwb, sb, None, 128, K)
    out = lq.ops.weight_only_linear_panel(x, pk.qpanel, pk.gparams, N, 128)
    errs["W4A16-panel"] = _rel_err(out, ref)
    sets = [(x, pk.qpanel.clone(), pk.gparams) for _ in range(_copies(pk.qpanel.numel() * 4, l2))]
    fn = lambda x, q, gp: lq.ops.weight_only_linear_panel(x, q, gp, N, 128)  # noqa: E731
    row["W4A16-panel"] = _time(fn, sets)
    row["W4A16-panel-graph"] = _time_graph(fn, sets)
    del sets
    row["err"] = errs
    return row


def bench_quantize(l2):
    x = torch.randn(8192, 4096, device=DEV, dtype=torch.bfloat16)  # 64 MiB
    sets = [(x,)] + [(x.clone(),) for _ in range(_copies(x.numel() * 2, l2) - 1)]
    t = _time(lambda a: lq.ops.quantize(a, 8, True, -1), sets)
    nbytes = x.numel() * 2 + x.numel() + x.shape[0] * 5  # read bf16, write int8 + scales/zp
    t4 = _time(lambda a: lq.ops.quantize(a, 4, False, 128), sets)
    nbytes4 = x.numel() * 2 + x.numel() // 2 + (x.numel() // 128) * 5
    return {"per_token_int8_us": t, "per_token_int8_GBps": nbytes / t / 1e3,
            "g128_int4_us": t4, "g128_int4_GBps": nbytes4 / t4 / 1e3}


def peak_copy_GBps():
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = _time(lambda: b.copy_(a), [()], batches=5)
    return 2 * a.numel() / t / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape (4096x4096)")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_cuda: needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    shapes = LLAMA_7B[:1] if args.quick else LLAMA_7B
    copy_bw = peak_copy_GBps()
    rows = []
    for N, K in shapes:
        for M in TOKENS:
            r = bench_shape(N, K, M, l2, args.quick)
            rows.append(r)
            print(json.dumps(r), flush=True)
    qb = bench_quantize(l2)
    lines = [f"Device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}; "
             f"{datetime.date.today()}; measured copy bandwidth {copy_bw:.0f} GB/s (read+write).",
             "",
             "Eager (batches of back-to-back calls):",
             "",
             "| N x K | M | bf16 µs | W8A8 µs | W8A8 / bf16 | W8A8-mma µs | int_mm+q µs | W8A16 µs | W4A16 µs "
             "| W4A16 / bf16 | W4A16-mma µs | W4A16-panel µs | panel / bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {f(r['bf16'])} | {f(r['W8A8'])} | "
                     f"{r['bf16'] / r['W8A8']:.2f}x | {f(r.get('W8A8-mma'))} | {f(r['int_mm+q'])} | "
                     f"{f(r['W8A16'])} | {f(r['W4A16'])} | {r['bf16'] / r['W4A16']:.2f}x | {f(r['W4A16-mma'])} | "
                     f"{f(r['W4A16-panel'])} | {r['bf16'] / r['W4A16-panel']:.2f}x |")
    lines += ["", "CUDA graphs (replayed; no host dispatch cost):", "",
              "| N x K | M | bf16 µs | W8A8 µs | W8A8 / bf16 | W8A8 weight GB/s (% of copy) | W4A16 µs | W4A16 / bf16 "
              "| W4A16-panel µs | panel / bf16 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wbw = r["N"] * r["K"] / r["W8A8-graph"] / 1e3
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['bf16-graph']:.1f} | {r['W8A8-graph']:.1f} | "
                     f"{r['bf16-graph'] / r['W8A8-graph']:.2f}x | {wbw:.0f} ({100 * wbw / copy_bw:.0f}%) | "
                     f"{r['W4A16-graph']:.1f} | {r['bf16-graph'] / r['W4A16-graph']:.2f}x | "
                     f"{r['W4A16-panel-graph']:.1f} | {r['bf16-graph'] / r['W4A16-panel-graph']:.2f}x |")
    lines += ["", f"Quantize (8192x4096 bf16 = 64 MiB): per-token int8 {qb['per_token_int8_us']:.1f} µs = "
              f"{qb['per_token_int8_GBps']:.0f} GB/s ({100 * qb['per_token_int8_GBps'] / copy_bw:.0f}% of copy); "
              f"g=128 int4 asym {qb['g128_int4_us']:.1f} µs = {qb['g128_int4_GBps']:.0f} GB/s "
              f"({100 * qb['g128_int4_GBps'] / copy_bw:.0f}%).",
              "", "Relative errors vs bf16 F.linear: " + "; ".join(
                  f"{r['N']}x{r['K']} M={r['M']}: " + ", ".join(
                      f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in r["err"].items())
                  for r in rows[:4])]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "quantize": qb, "copy_GBps": copy_bw, "device": props.name}, fh, indent=1)


if __name__ == "__main__":
    main()
