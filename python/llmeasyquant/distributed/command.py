"""``llmeasyquant quantize --distributed``: one rank of a torchrun job."""

from __future__ import annotations

import os
import time
from typing import Optional

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


def _share_cores(device: torch.device, world: int) -> None:
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one node share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)  # never a half-written file


def quantize_distributed(*, model: str, method: str, out: str, calib=None, data_parallel: bool = False,
                         backend: str = "auto", device: Optional[str] = None, timeout_s: float = 300.0,
                         breakdown: Optional[str] = None, overwrite: bool = False, quiet: bool = False,
                         trust_remote_code: bool = False, options: Optional[dict] = None) -> Optional[str]:
    """One rank of ``torchrun ... llmeasyquant quantize --distributed``: load
    ``model`` (a path or name for :func:`llmeasyquant.models.load_model`),
    quantize it with ``method`` and ``options`` over the ranks, and on rank 0
    save it to ``out`` and write the per-layer time ``breakdown`` (Markdown) if
    given. ``backend``/``device``/``timeout_s`` go to
    :func:`llmeasyquant.distributed.runtime.init`.

    Returns the timing report on rank 0, None on the other ranks."""
    from ..io import save

    from ..models import load_model
    from ..models.extract import extract
    from . import quantize

    backend, dev = init(backend, device=device, timeout_s=timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    report = None
    try:
        _share_cores(dev, world)
        t_load = time.perf_counter()
        net, tok = load_model(model, trust_remote_code=trust_remote_code)
        net.to(dev)
        t_load = time.perf_counter() - t_load
        timer = Breakdown(dev)
        t0 = time.perf_counter()
        quantize(net, method, calib=calib, tokenizer=tok, data_parallel=data_parallel, timer=timer,
                 progress=not quiet, **(options or {}))
        wall = time.perf_counter() - t0
        mine = {"totals": timer.totals(), "wall": wall, "sent": timer.bytes_sent, "received": timer.bytes_received,
                "blocks": timer.by_block(extract(net).arch.layers_path), "load_model": t_load}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            save(net.cpu(), out, tokenizer=tok, overwrite=overwrite)
            head = (f"{net.llmeq_config.describe()} on {world} rank(s) ({backend}, {dev.type}, "
                    f"{'data-parallel' if data_parallel else 'replicated'} calibration): "
                    f"{wall:.1f} s, identical on every rank (checksums), saved to {out}")
            report = "\n\n".join([head, "Per rank (seconds in each phase of paper eq. 12, plus calibration):",
                                   _rank_table(everyone),
                                   format_table(everyone[0]["blocks"], "Rank 0, per decoder block:")])
            if breakdown:
                _write_text(breakdown, report)
        dist.barrier()
    finally:
        shutdown()
    return report
