"""Distributed quantization of the default model: wall time vs number of
ranks (gloo processes on this machine), communication volume per rank, the
per-block time breakdown (paper eq. 12), and what keeping online (EMA)
activation scales consistent across ranks costs.

Every configuration must produce the model the 1-rank run produced
(replicated calibration: bit-identical; checked by SHA-256 of every tensor).

Run:  python benchmarks/bench_distributed.py [--method gptq] [--ranks 1,2,4]
          [--calib-samples 16] [--out docs/results/distributed.md]

On a machine with C cores each of P ranks gets max(1, C // P) torch threads;
P > C oversubscribes the cores and says so in the table.
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


def quantize_rank(rank, world, model_name, method, options, data_parallel):
    import llmeasyquant.distributed as lqd
    from llmeasyquant.models import load_model
    from llmeasyquant.models.extract import extract

    model, tok = load_model(model_name)
    timer = lqd.Breakdown()
    t0 = time.perf_counter()
    lqd.quantize(model, method, tokenizer=tok, data_parallel=data_parallel, timer=timer, progress=False, **options)
    wall = time.perf_counter() - t0
    digest = lqd.model_digests(model)
    return {"wall": wall, "totals": timer.totals(), "sent": timer.bytes_sent, "received": timer.bytes_received,
            "blocks": timer.by_block(extract(model).arch.layers_path), "digest": digest}


def ema_rank(rank, world, model_name, every_list, steps, tokens):
    """Forward time of a W8A8-EMA model without sync and with EMASync(every=k)."""
    import llmeasyquant as lq
    from llmeasyquant.distributed.ema_sync import EMASync
    from llmeasyquant.models import load_model

    model, _ = load_model(model_name)
    lq.replace_linear(model, act="ema")
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, model.config.vocab_size, (1, tokens), generator=g) for _ in range(steps)]
    out = {}
    with torch.no_grad():
        model(batches[0])  # warm-up
        for every in [0] + list(every_list):
            sync = EMASync(model, every=every) if every else None
            t0 = time.perf_counter()
            for b in batches:
                model(b)
            out[every] = {"per_forward_ms": 1e3 * (time.perf_counter() - t0) / steps,
                          "sync_ms": 1e3 * sync.seconds / max(1, sync.syncs) if sync else 0.0,
                          "syncs": sync.syncs if sync else 0, "bytes": sync.bytes_per_sync() if sync else 0}
            if sync:
                sync.remove()
    return out


def main():
    from llmeasyquant.distributed.local import run_local
    from llmeasyquant.distributed.timing import PHASES, format_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--modes", default="replicated,data-parallel")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--w-group-size", type=int, default=None, help="method default unless given")
    ap.add_argument("--ema-every", default="1,8,32")
    ap.add_argument("--out", default=None, help="Markdown file (written atomically)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    options = {"n_calib": args.calib_samples}
    if args.w_group_size is not None:
        options["w_group_size"] = args.w_group_size
    rows, breakdown = [], None
    base_wall, base_digest = None, None
    for mode in args.modes.split(","):
        for P in [int(p) for p in args.ranks.split(",")]:
            if mode == "data-parallel" and P == 1:
                continue
            threads = max(1, cores // P)
            print(f"{args.method}: {P} rank(s), {mode}, {threads} thread(s) each ...", flush=True)
            run = run_local(quantize_rank, P, args.model, args.method, options, mode == "data-parallel",
                            timeout_s=3600, threads=threads, pg_timeout_s=1800)
            res = run.ordered()
            wall = max(r["wall"] for r in res)
            if P == 1:
                base_wall, base_digest = wall, res[0]["digest"]
            if P == 2 and mode == "replicated":
                breakdown = res[0]["blocks"]
            rows.append({"P": P, "mode": mode, "threads": threads, "wall": wall,
                         "sent": max(r["sent"] for r in res), "received": max(r["received"] for r in res),
                         "totals": res[0]["totals"], "same": all(r["digest"] == base_digest for r in res)})
            print(f"  {wall:.1f} s", flush=True)

    lines = [f"### Distributed {args.method} on {args.model}", "",
             f"{datetime.date.today()}, {platform.machine()} with {cores} cores, torch {torch.__version__}, gloo over "
             f"loopback; calibration {args.calib_samples} x 512 tokens of WikiText-2 validation (tokenizing it is "
             f"part of each wall time). Command: `python benchmarks/{' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}`",
             "",
             "| ranks | calibration | threads/rank | wall s | speedup | efficiency | sent MiB/rank | received MiB/rank "
             "| rank 0: " + " / ".join(PHASES) + " s | same model as 1 rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = base_wall / r["wall"] if base_wall else float("nan")
        over = " (oversubscribed)" if r["P"] > cores else ""
        lines.append(f"| {r['P']}{over} | {r['mode']} | {r['threads']} | {r['wall']:.1f} | {sp:.2f}x | "
                     f"{sp / r['P']:.0%} | {r['sent'] / 2**20:.2f} | {r['received'] / 2**20:.2f} | "
                     + " / ".join(f"{r['totals'][p]:.1f}" for p in PHASES)
                     + f" | {'yes' if r['same'] else 'no (data-parallel Hessian sums)'} |")
    if breakdown:
        lines += ["", format_table(breakdown, "Per-block breakdown, rank 0 of the 2-rank replicated run (eq. 12):")]

    if args.ema_every:
        every = [int(e) for e in args.ema_every.split(",")]
        print("EMA scale sync, 2 ranks ...", flush=True)
        ema = run_local(ema_rank, 2, args.model, every, 32, 64, timeout_s=1800, threads=max(1, cores // 2)).ordered()
        e0 = ema[0]
        lines += ["", f"EMA activation-scale sync (W8A8 EMA {args.model}, 2 ranks, 32 forwards of 64 tokens, rank 0):",
                  "", "| sync every | ms per forward | overhead | ms per sync | bytes per sync |", "|---|---|---|---|---|"]
        for k, v in e0.items():
            ov = v["per_forward_ms"] / e0[0]["per_forward_ms"] - 1
            lines.append(f"| {'never' if k == 0 else k} | {v['per_forward_ms']:.1f} | {ov:+.1%} | "
                         f"{v['sync_ms']:.2f} | {v['bytes']} |")
    if args.out:
        try:
            from llmeasyquant import plots

            out_dir = os.path.dirname(os.path.abspath(args.out))
            figs = []
            if breakdown:
                figs += plots.plot_breakdown(breakdown, out_dir, "distributed_breakdown",
                                             f"{args.method} on {args.model}: rank 0 of 2, time per phase per block")
            figs += plots.plot_breakdown({f"{r['P']} rank(s)\n{r['mode']}": r["totals"] for r in rows}, out_dir,
                                         "distributed_scaling", f"{args.method} on {args.model}: rank 0 time per "
                                         "phase (wall time also includes tokenization)", xlabel="run")
            lines += [""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figs if f.endswith(".png")]
        except ImportError as err:
            lines += ["", f"(plots not drawn: {err})"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
            json.dump({"rows": rows, "breakdown": breakdown}, fh, indent=1)


if __name__ == "__main__":
    main()
