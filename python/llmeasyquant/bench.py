"""``llmeasyquant bench``: QLinear vs peers on the CPU, one process, one run
(protocol: PERF.md of the project), plus op-level timings (``--ops``).

Compared per (N, K, M), fp32 activations in and out, quantization included:
  fp32      torch.nn.functional.linear (MKL/oneDNN sgemm)
  ao-dyn    torch.ao.quantization.quantize_dynamic Linear (fbgemm, per-tensor act.)
  int_mm    torch._int_mm on pre-quantized int8 (GEMM only, no quantization)
  W8A8      llmeasyquant QLinear act="dynamic" (per-token act., per-channel weights;
            on AVX-512 VNNI CPUs from its pre-packed weight copy, and "W8A8-rm"
            the same layer on the row-major kernel, for the gain)
  W8A16     llmeasyquant QLinear act=None, 8-bit per-channel weights
  W4A16     llmeasyquant QLinear act=None, 4-bit group-wise weights, g = 128 where it
            divides K, else the largest of 64 / 32 that does (SmolLM2's K = 576: g64)

Each method is checked against fp32 before it is timed. Weight copies are
rotated so that their total exceeds the last-level cache ("cold" weights),
which is what decode (small M) sees in a real model.

Run:  OMP_WAIT_POLICY=ACTIVE llmeasyquant bench [--shapes smollm2] [--tokens 1,16] [--ops]
      (benchmarks/bench_qlinear.py --write-docs records the table in docs/benchmarks.md)
"""

from __future__ import annotations

import datetime
import glob
import os
import platform
import statistics
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import llmeasyquant as lq

# Layer shapes (N = out_features, K = in_features)
LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
GPT2_SMALL = [(2304, 768), (3072, 768), (768, 3072)]
SMOLLM2_135M = [(576, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 16, 128, 2048]
CPU_SHAPES = {
    "llama": LLAMA_7B,
    "gpt2": GPT2_SMALL,
    "smollm2": SMOLLM2_135M,
    "all": LLAMA_7B + GPT2_SMALL,
    "quick": [(256, 384)],
}

def _llc_bytes(default: int = 32 * 2**20) -> int:
    """This CPU's last-level cache (Linux sysfs; ``default`` where it cannot be read).
    It differs between our machines: 32 MiB (EPYC) to 480 MiB (Xeon with AMX)."""
    try:
        for idx in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
            with open(os.path.join(idx, "level")) as fh:
                if fh.read().strip() != "3":
                    continue
            with open(os.path.join(idx, "size")) as fh:
                size = fh.read().strip()
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError):
        pass
    return default


LLC_BYTES = _llc_bytes()  # rotate weights beyond 3x of it (as far as the copy cap allows)


def write_text_atomic(path, text: str) -> None:
    """Write a benchmark's table: to a sibling temp file, then renamed over
    ``path``, so an interrupted run never leaves a half-written table."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def w4_group(K: int) -> int:
    """The W4A16 group size for in_features K (the usual 128 where it divides K)."""
    return next((g for g in (128, 64, 32) if K % g == 0), -1)


def cold_copies(nbytes: int, most: int = 16) -> int:
    """How many copies of ``nbytes`` of weights exceed 3x the LLC (cold
    weights, what decode sees), at most ``most``."""
    return max(1, min(most, -(-3 * LLC_BYTES // max(nbytes, 1))))


def seeded_linear(N: int, K: int, gen: torch.Generator) -> nn.Linear:
    """A float ``nn.Linear(K, N)`` with weights ~ N(0, 1/K) and a small bias from ``gen``."""
    lin = nn.Linear(K, N).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) / K**0.5)
        lin.bias.copy_(torch.randn(N, generator=gen) * 0.1)
    return lin


def _rotating(make, nbytes: int):
    """Enough independent copies of a layer that their weights exceed the LLC."""
    return [make() for _ in range(cold_copies(nbytes, most=8))]


def _time(fns, x, reps: int, warmup: int) -> float:
    """Median seconds of fn(x), cycling through the rotated copies."""
    i = 0
    for _ in range(warmup):
        fns[i % len(fns)](x)
        i += 1
    ts = []
    for _ in range(reps):
        f = fns[i % len(fns)]
        i += 1
        t0 = time.perf_counter()
        f(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _prime(layers: dict, x) -> None:
    """Call every rotated copy once: what a layer derives on its first call
    (QLinear's pre-packed CPU weights) is then not timed in the first round."""
    for fns in layers.values():
        for f in fns:
            f(x)


def interleaved_ratios(layers: dict, x, reps: int, rounds: int, base: str = "fp32") -> dict:
    """``{name: (median s, [base time / its time, per round])}`` for the
    rotated copies in ``layers`` (``{name: [fn, ...]}``), every name timed once
    per round in turn, so drift between rounds cancels in the ratios."""
    _prime(layers, x)
    times = {k: [] for k in layers}
    for _ in range(rounds):
        for name, fns in layers.items():
            times[name].append(_time(fns, x, reps, warmup=3))
    return {k: (statistics.median(v), [f / t for f, t in zip(times[base], v)]) for k, v in times.items()}


def bench_shape(N: int, K: int, M: int, reps: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(N * 7 + K)
    base = nn.Linear(K, N)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
    x = torch.randn(M, K, generator=g)
    ref = base(x)

    def q(row_major=False, **cfg):
        def make():
            layer = lq.QLinear.from_linear(base, **cfg)
            if row_major:  # the row-major int8 kernel, without the CPU's pre-packed copy
                layer.prepack_cpu_weights = False
            return layer
        return make

    methods = {
        "fp32": (lambda: (lambda l: (lambda t: F.linear(t, l.weight, l.bias)))(
            nn.Linear(K, N).requires_grad_(False)), 4 * N * K),
        "ao-dyn": (lambda: torch.ao.quantization.quantize_dynamic(
            nn.Sequential(base), {nn.Linear}, dtype=torch.qint8), N * K),
        "W8A8": (q(act="dynamic"), N * K),
        **({"W8A8-rm": (q(act="dynamic", row_major=True), N * K)} if lq.ops.int8_prepacked_fast() else {}),
        "W8A16": (q(act=None), N * K),
        "W4A16": (q(act=None, w_bits=4, w_group_size=w4_group(K)), N * K // 2),
    }
    out = {}
    with torch.inference_mode():
        layers = {}
        for name, (make, nbytes) in methods.items():
            layers[name] = _rotating(make, nbytes)
            if name != "fp32":
                layer = layers[name][0]
                y = layer(x)
                # kernel check: against float math on the weight the layer really holds
                # (isolates kernel error from quantization error)
                if isinstance(layer, lq.QLinear):
                    check = F.linear(x, layer.dequantize(), layer.bias)
                    tol = 0.02 if layer.act else 1e-4
                else:
                    check, tol = ref, 0.05
                rel = ((y - check).norm() / check.norm()).item()
                if rel > tol:
                    raise AssertionError(f"{name} is wrong at N={N} K={K} M={M}: rel. error {rel:.3g} > {tol}")
                out[f"{name}_err"] = ((y - ref).norm() / ref.norm()).item()
        qa = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
        qb = [torch.randint(-127, 128, (K, N), dtype=torch.int8, generator=g)
              for _ in range(max(1, min(8, -(-3 * LLC_BYTES // (N * K)))))]
        int_mm = None
        try:
            torch._int_mm(qa, qb[0])
            int_mm = [lambda t, b=b: torch._int_mm(t, b) for b in qb]
        except RuntimeError as err:  # not available for this shape/device
            out["int_mm_error"] = str(err).splitlines()[0]
        _prime(layers, x)
        times = {k: [] for k in list(methods) + (["int_mm"] if int_mm else [])}
        for _ in range(rounds):  # rounds interleave methods so drift hits all alike
            for name, fns in layers.items():
                times[name].append(_time(fns, x, reps, warmup=3))
            if int_mm:
                times["int_mm"].append(_time(int_mm, qa, reps, warmup=3))
    for name, ts in times.items():
        out[name] = statistics.median(ts)
        out[f"{name}_spread"] = (min(ts), max(ts))
    return out


def fmt_table(results: list[dict]) -> str:
    head = ("| N x K | M | fp32 ms | W8A8 ms | vs fp32 | vs ao-dyn | W8A8 GOP/s | pre-packed vs row-major | "
            "W8A16 vs fp32 | W4A16 vs fp32 | ao-dyn vs fp32 | int_mm ms (GEMM only) |")
    lines = [head, "|" + "|".join("---" for _ in range(12)) + "|"]
    for r in results:
        s = r["stats"]
        f, w8 = s["fp32"], s["W8A8"]
        gops = 2 * r["M"] * r["N"] * r["K"] / w8 / 1e9
        lo, hi = s["W8A8_spread"]
        ao_lo, ao_hi = s["ao-dyn_spread"]
        ratio_ao = s["ao-dyn"] / w8
        ratio_ao_rng = f"{ao_lo / hi:.2f}-{ao_hi / lo:.2f}"
        im = f"{s['int_mm'] * 1e3:.3f}" if "int_mm" in s else "n/a"
        rm = f"{s['W8A8-rm'] / w8:.2f}x" if "W8A8-rm" in s else "n/a (no pre-packed kernel)"
        lines.append(
            f"| {r['N']}x{r['K']} | {r['M']} | {f * 1e3:.3f} | {w8 * 1e3:.3f} | {f / w8:.2f}x | "
            f"{ratio_ao:.2f}x ({ratio_ao_rng}) | {gops:.0f} | {rm} | {f / s['W8A16']:.2f}x | {f / s['W4A16']:.2f}x | "
            f"{f / s['ao-dyn']:.2f}x | {im} |")
    return "\n".join(lines)


def parse_tokens(spec: str) -> list[int]:
    """Token counts M from a comma-separated string (the CLI's ``--tokens 1,16``)."""
    try:
        tokens = [int(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"tokens: expected comma-separated integers, got {spec!r}") from None
    return _check_tokens(tokens, spec)


def _check_tokens(tokens: list[int], given) -> list[int]:
    if not tokens or min(tokens) < 1:
        raise ValueError(f"tokens: expected positive token counts, got {given!r}")
    return tokens


def _resolve_shapes(shapes) -> list[tuple[int, int]]:
    if isinstance(shapes, str):
        if shapes not in CPU_SHAPES:
            raise ValueError(f"shapes: expected one of {', '.join(sorted(CPU_SHAPES))} or a list of (N, K), "
                             f"got {shapes!r}")
        return CPU_SHAPES[shapes]
    out = [tuple(s) for s in shapes]
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise ValueError(f"shapes: expected (N, K) pairs of positive integers, got {shapes!r}")
    return out


def bench_ops(N: int, K: int, M: int, reps: int) -> dict:
    """Median ms of each op alone on fresh inputs (CPU)."""
    from . import ops

    g = torch.Generator().manual_seed(N + K + M)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    qw, ws, _ = ops.quantize(w, 8, True, -1)
    qa, xs, _ = ops.quantize(x, 8, True, -1)
    g4 = w4_group(K)
    q4, s4, z4 = ops.quantize(w, 4, False, g4)
    wsum = ops.weight_row_sums(qw)
    res = {}
    for name, fn in {
        "quantize per-token": lambda: ops.quantize(x, 8, True, -1),
        "int8 GEMM (int32 out)": lambda: ops.int8_gemm(qa, qw),
        "dynamic quant linear": lambda: ops.dynamic_quant_linear(x, qw, ws.view(-1), wsum),
        "weight-only W4": lambda: ops.weight_only_linear(x, q4, s4, z4, 4, g4),
    }.items():
        res[name] = median_ms(fn, reps)
    return res


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run(*, threads: int = 2, reps: int = 50, rounds: int = 3,
        shapes: str | Sequence[tuple[int, int]] = "llama", tokens: str | Sequence[int] = TOKENS,
        ops: bool = False, command: str = "") -> tuple[str, str]:
    """Benchmark every layer shape (N, K) x token count M; returns (header,
    Markdown table) and prints one line per point as it goes.

    ``shapes``: a name in :data:`CPU_SHAPES` or a list of (N, K); ``tokens``: M
    values, or a comma-separated string of them; ``reps`` timed runs per
    round, ``rounds`` rounds; ``ops`` adds the ops alone; ``command`` is
    recorded in the header. Sets torch's thread count to ``threads``."""
    for name, v in (("threads", threads), ("reps", reps), ("rounds", rounds)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    shape_list = _resolve_shapes(shapes)
    tokens = parse_tokens(tokens) if isinstance(tokens, str) else _check_tokens(list(tokens), tokens)
    torch.set_num_threads(threads)
    results, op_rows = [], []
    for (N, K) in shape_list:
        for M in tokens:
            # the largest products get fewer runs: each run takes seconds there
            n_reps = reps if M * N * K < 2048 * 4096 * 4096 // 2 else max(10, reps // 5)
            stats = bench_shape(N, K, M, n_reps, rounds)
            results.append(dict(N=N, K=K, M=M, stats=stats))
            print(f"N={N} K={K} M={M}: " + ", ".join(
                f"{k}={v * 1e3:.3f}ms" for k, v in stats.items() if not k.endswith(("_err", "_spread", "_error"))),
                flush=True)
            if ops:
                op_rows.append((N, K, M, bench_ops(N, K, M, n_reps)))
    table = fmt_table(results)
    if op_rows:
        table += "\n\n" + _ops_table(op_rows)
    return _header(threads, reps, rounds, command), table


def _ops_table(op_rows: list[tuple[int, int, int, dict]]) -> str:
    names = list(op_rows[0][3])
    return ("Ops alone (median ms):\n\n| N x K | M | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names)
            + "\n" + "\n".join(f"| {N}x{K} | {M} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |"
                                for N, K, M, r in op_rows))


def _header(threads: int, reps: int, rounds: int, command: str) -> str:
    return (f"### QLinear W8A8 dynamic vs peers (CPU)\n\n"
            f"- date: {datetime.date.today().isoformat()}; CPU: {_cpu_name()}, {threads} threads; "
            f"torch {torch.__version__}; llmeasyquant {lq.__version__} (ISA {lq.build_info()['cpu_isa_active']})\n"
            f"- command: `{command}`\n"
            f"- fp32 activations in/out, quantization of activations included in W8A8 and ao-dyn; "
            f"weights rotated over copies past 3x the {LLC_BYTES >> 20} MiB L3, at most 8 copies per layer "
            f"(where 8 copies fit in 3x the L3, the weights are partly L3-resident); median of {reps} runs "
            f"per round (fewer at the largest M), median over {rounds} rounds; ratio ranges in "
            f"parentheses are the worst/best pairing of per-round medians.")
