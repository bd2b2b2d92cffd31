"""What calibration costs, on the real default model (SmolLM2-135M), CPU.

Measures, in one process, over the same calibration windows:
- a plain forward of the model over the samples (the unit);
- SmoothQuant's statistics (per-channel absmax/min/max of every linear input)
  through the blockwise driver, and through a whole-model pass with hooks;
- GPTQ W4 g64 end to end, split into the driver's stages (capture, Hessian
  accumulation, quantize, forward of the quantized block) and the time inside
  ``gptq_quantize`` (its own linear algebra);
- peak memory of each (process RSS high-water mark, reset per stage).

Run:  python benchmarks/bench_calibration.py [--samples 16] [--seq-len 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import llmeasyquant as lq
import llmeasyquant.methods.gptq as gptq_method
from llmeasyquant.bench import _cpu_name
from llmeasyquant.calibration import ChannelStats, calibration_batches, collect_input_stats
from llmeasyquant.models import load_default_model
from llmeasyquant.models.extract import extract
from llmeasyquant.peak_memory import measure_peak
from llmeasyquant.pipeline import observe_blocks


def _best(fn, rounds: int) -> float:
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the statistics timings (best of)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_default_model()
    batches = calibration_batches(tok, n_samples=args.samples, seq_len=args.seq_len)
    spec = extract(model)
    paths = spec.linear_paths()

    def forward():
        with torch.no_grad():
            for ids in batches:
                model(ids, use_cache=False)

    def stats_blockwise():
        st = {p: ChannelStats.empty(model.get_submodule(p).in_features) for p in paths}
        observe_blocks(model, spec, batches, paths, lambda p, x: st[p].update(x.float()), progress=False)

    def stats_whole_model():
        collect_input_stats(model, paths, batches, progress=False)

    forward()  # warm up (allocator, OpenMP pool)
    # interleaved rounds, best of each: a drift in machine load hits all three alike
    fns = {"plain forward": forward, "SmoothQuant statistics, blockwise driver": stats_blockwise,
           "SmoothQuant statistics, whole-model pass": stats_whole_model}
    times = {k: [] for k in fns}
    peaks = {}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            with measure_peak() as peak:
                times[name].append(_best(fn, 1))
            peaks[name] = peak
    rows = [(name, min(times[name]), peaks[name]) for name in fns]
    t_fwd = rows[0][1]

    inside, grams = [], []
    solver, add_gram = gptq_method.gptq_quantize, gptq_method._add_gram

    def timed(fn, log):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                log.append(time.perf_counter() - t0)
        return run

    gptq_method.gptq_quantize, gptq_method._add_gram = timed(solver, inside), timed(add_gram, grams)
    try:
        with measure_peak() as peak:
            t0 = time.perf_counter()
            lq.quantize(model, "gptq", calib=batches, progress=False)
            t_gptq = time.perf_counter() - t0
    finally:
        gptq_method.gptq_quantize, gptq_method._add_gram = solver, add_gram
    rep = model.llmeq_report.pipeline
    print(f"### Calibration cost (CPU)\n\n- date: {datetime.date.today().isoformat()}; CPU: {_cpu_name()}, "
          f"{args.threads} threads; ISA {lq.build_info()['cpu_isa_active']}; torch {torch.__version__}\n"
          f"- model: SmolLM2-135M fp32, {args.samples} calibration windows x {args.seq_len} tokens "
          f"(WikiText-2 validation); best of {args.rounds} interleaved rounds for the statistics\n"
          f"- command: `python benchmarks/bench_calibration.py --samples {args.samples} --seq-len {args.seq_len} "
          f"--threads {args.threads}`\n")
    print("| what | s | x plain forward | peak RSS MiB |\n|---|---|---|---|")
    for name, t, peak in rows:
        print(f"| {name} | {t:.2f} | {t / t_fwd:.2f}x | {(peak.rss_peak_bytes or 0) / 2**20:.0f} |")
    s = rep.seconds
    solver_s = sum(inside)
    print(f"| GPTQ W4 g64 end to end | {t_gptq:.2f} | {t_gptq / t_fwd:.2f}x | {(peak.rss_peak_bytes or 0) / 2**20:.0f} |")
    gram_s = sum(grams)
    print(f"\nGPTQ stages: capture {s['capture']:.2f} s, calibration pass {s['observe']:.2f} s (of which X^T X "
          f"accumulation in float64 {gram_s:.2f} s), quantize {s['quantize']:.2f} s (of which gptq_quantize "
          f"{solver_s:.2f} s over {len(inside)} layers, median {statistics.median(inside) * 1e3:.0f} ms), forward "
          f"of the quantized blocks {s['forward']:.2f} s. GPTQ's own linear algebra (X^T X + gptq_quantize): "
          f"{100 * (gram_s + solver_s) / t_gptq:.0f} % of the run (gptq_quantize alone {100 * solver_s / t_gptq:.0f} "
          f"%); calibration activations held at most {rep.peak_activation_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
