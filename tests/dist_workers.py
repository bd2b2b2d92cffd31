"""Rank functions for tests/test_distributed.py (module level: spawned ranks
import them by name)."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

import llmeasyquant as lq
import llmeasyquant.distributed as lqd
from llmeasyquant.calibration import collect_input_stats
from llmeasyquant.distributed import tensor_parallel as tp
from llmeasyquant.distributed.ema_sync import EMASync, ema_states
from llmeasyquant.models.extract import extract

import tiny_models


def calib_batches(n: int = 8, seq: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tiny_models.VOCAB, (1, seq), generator=g) for _ in range(n)]


def quantize_single(rank, world, arch, method, options):
    """The reference: one process, plain llmeasyquant.quantize."""
    model = tiny_models.build(arch)
    lq.quantize(model, method, calib=calib_batches(), progress=False, **options)
    return lqd.model_digests(model)


def quantize_sharded(rank, world, arch, method, options, data_parallel):
    model = tiny_models.build(arch)
    timer = lqd.Breakdown()
    lqd.quantize(model, method, calib=calib_batches(), data_parallel=data_parallel, timer=timer, progress=False,
                 **options)
    return {"digests": lqd.model_digests(model), "state": {k: v.clone() for k, v in model.state_dict().items()},
            "totals": timer.totals(), "sent": timer.bytes_sent, "received": timer.bytes_received}


def stats_data_parallel(rank, world):
    """Data-parallel activation statistics vs the same statistics over all batches."""
    model = tiny_models.build("llama")
    spec = extract(model)
    paths = spec.linear_paths()
    batches = calib_batches()
    shard = lqd.ProcessShard(data_parallel=True)
    local = collect_input_stats(model, paths, shard.local_batches(batches), progress=False)
    shard.reduce_stats_(local)
    full = collect_input_stats(model, paths, batches, progress=False)
    return {p: all(torch.equal(getattr(local[p], f), getattr(full[p], f)) for f in ("absmax", "min", "max"))
            for p in paths}


def _tp_model(act, w_bits, group):
    model = tiny_models.build("llama")
    lq.replace_linear(model, act=act, w_bits=w_bits, w_group_size=group, w_symmetric=(w_bits == 8),
                      act_symmetric=False)
    return model


def tensor_parallel_block(rank, world, act, w_bits, group):
    """One decoder block: single-device output vs the TP-sharded block's output."""
    model = _tp_model(act, w_bits, group)
    block = model.model.layers[0]
    torch.manual_seed(5)
    x = torch.randn(2, 7, 64)
    pos = torch.arange(7).unsqueeze(0).expand(2, -1)
    emb = model.model.rotary_emb(x, pos)
    ref = block(x, position_embeddings=emb, attention_mask=None)
    ref = ref[0] if isinstance(ref, tuple) else ref
    tp.shard_block(block, "llama", rank, world)
    out = block(x, position_embeddings=emb, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    return (out - ref).abs().max().item(), ref.abs().max().item()


TP_CASES = [("dynamic", 8, -1), (None, 4, 16), ("dynamic", 4, 16), (None, 8, -1)]


def tensor_parallel_layers(rank, world):
    """Column- and row-parallel QLinear against the unsharded layer, for every
    case in TP_CASES and M in (1, 5): {(act, bits, group, M): (col err, row err, scale)}."""
    out = {}
    for act, w_bits, group in TP_CASES:
        for M in (1, 5):
            torch.manual_seed(3)
            lin = torch.nn.Linear(128, 96, bias=True)
            ql = lq.QLinear.from_linear(lin, w_bits=w_bits, w_group_size=group, w_symmetric=(w_bits == 8),
                                        act=act, act_symmetric=False)
            x = torch.randn(M, 128) * 3
            ref = ql(x)
            col = tp.ColumnParallelQLinear.from_qlinear(ql, rank, world, gather_output=True)
            row = tp.RowParallelQLinear.from_qlinear(ql, rank, world)
            k = 128 // world
            out[(act, w_bits, group, M)] = ((col(x) - ref).abs().max().item(),
                                            (row(x[:, rank * k:(rank + 1) * k]) - ref).abs().max().item(),
                                            ref.abs().max().item())
    return out


def ema_sync(rank, world, every, mode):
    torch.manual_seed(0)
    model = tiny_models.build("llama")
    lq.replace_linear(model, act="ema")
    sync = EMASync(model, every=every, mode=mode)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    before = None
    for step in range(2 * every):
        ids = torch.randint(0, tiny_models.VOCAB, (1, 16), generator=g) * (rank + 1) % tiny_models.VOCAB
        model(ids)
        if step == 0:
            before = ema_states(model).clone()
    after = ema_states(model)
    gathered = [torch.empty_like(after) for _ in range(world)]
    dist.all_gather(gathered, after)
    return {"equal_after": all(torch.equal(gathered[0], t) for t in gathered), "before": before,
            "syncs": sync.syncs, "seconds": sync.seconds}


def dies_midway(rank, world):
    """Rank 1 dies right after joining; the others must fail with PeerFailure, not hang."""
    if rank == 1:
        time.sleep(1.0)
        os._exit(3)
    model = tiny_models.build("llama")
    t0 = time.perf_counter()
    try:
        lqd.quantize(model, "gptq", calib=calib_batches(), progress=False, w_group_size=16)
    except lqd.PeerFailure as err:
        return {"error": str(err), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def quantize_mismatched(rank, world):
    """Rank 1 was started with other options: every rank must refuse at once."""
    model = tiny_models.build("llama")
    try:
        lqd.quantize(model, "absmax", progress=False, w_bits=8 if rank == 0 else 4,
                     w_group_size=-1 if rank == 0 else 16, act=None)
    except lqd.PeerFailure as err:
        return {"error": str(err)}
    return {"error": None}


def fails_while_peer_stopped(rank, world):
    """Rank 0 fails; rank 1 is stopped (SIGSTOP) and would never report."""
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(600)
    raise ValueError("rank 0 gave up")


def quantize_command(rank, world, src, out, breakdown):
    """The torchrun entry's library function, called with typed arguments on every rank."""
    from llmeasyquant.distributed.command import quantize_distributed

    return quantize_distributed(model=src, method="absmax", out=out, calib=None, backend="gloo", device="cpu",
                                timeout_s=60, breakdown=breakdown, quiet=True, options={"act": "dynamic"})
