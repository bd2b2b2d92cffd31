"""``llmeasyquant quantize --distributed``: one rank of a torchrun job."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from .runtime import init, shutdown
from .timing import PHASES, Breakdown, format_table


def _rank_table(per_rank: list[dict]) -> str:
    lines = ["| rank | " + " | ".join(f"{p} s" for p in PHASES) + " | wall s | sent MiB | received MiB |",
             "|---" * (len(PHASES) + 4) + "|"]
    for r, d in enumerate(per_rank):
        lines.append(f"| {r} | " + " | ".join(f"{d['totals'][p]:.2f}" for p in PHASES)
                     + f" | {d['wall']:.2f} | {d['sent'] / 2**20:.2f} | {d['received'] / 2**20:.2f} |")
    return "\n".join(lines)


def quantize_distributed(args, opts: dict) -> int:
    import llmeasyquant as lq

    from ..models import load_model
    from ..models.extract import extract
    from . import quantize

    backend, device = init(args.backend, device=args.device, timeout_s=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # ranks on one node share its cores
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        t_load = time.perf_counter()
        model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
        model.to(device)
        t_load = time.perf_counter() - t_load
        timer = Breakdown(device)
        t0 = time.perf_counter()
        quantize(model, args.method, calib=args.calib, tokenizer=tok, data_parallel=args.data_parallel,
                 timer=timer, progress=not args.quiet, **opts)
        wall = time.perf_counter() - t0
        mine = {"totals": timer.totals(), "wall": wall, "sent": timer.bytes_sent, "received": timer.bytes_received,
                "blocks": timer.by_block(extract(model).arch.layers_path), "load_model": t_load}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            lq.save(model.cpu(), args.out, tokenizer=tok, overwrite=args.overwrite)
            head = (f"{model.llmeq_config.describe()} on {world} rank(s) ({backend}, {device.type}, "
                    f"{'data-parallel' if args.data_parallel else 'replicated'} calibration): "
                    f"{wall:.1f} s, identical on every rank (checksums), saved to {args.out}")
            report = "\n\n".join([head, "Per rank (seconds in each phase of paper eq. 12, plus calibration):",
                                  _rank_table(everyone),
                                  format_table(everyone[0]["blocks"], "Rank 0, per decoder block:")])
            print(report)
            if args.breakdown:
                tmp = f"{args.breakdown}.tmp{os.getpid()}"
                with open(tmp, "w") as fh:
                    fh.write(report + "\n")
                os.replace(tmp, args.breakdown)
        dist.barrier()
    finally:
        shutdown()
    return 0
