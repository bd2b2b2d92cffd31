"""Who quantizes what, and how results reach every rank: :class:`ProcessShard`
implements the :class:`llmeasyquant.sharding.Shard` interface methods call
with torch.distributed collectives:

* ``assign(keys, costs)`` - partition work units (layers, scale groups) over
  ranks, largest cost first onto the least-loaded rank (deterministic, so every
  rank computes the same map without talking);
* ``local_batches`` - data-parallel calibration: rank r keeps batches r, r+P, ...;
* ``reduce_stats_`` / ``reduce_to_owner_`` - global statistics: max for
  absmax/max, min for min, sum for Hessians (paper "global scale sync");
* ``share`` - a small result (a searched alpha, a scale vector) from its owner;
* ``gather_modules`` - every rank receives the quantized layers the others
  produced (weights, scales, zero-points: paper eq. 7-8), one flat byte buffer
  per owner.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..nn.qlinear import QLinear
from ..sharding import Shard
from .runtime import collective
from .timing import Breakdown


class ProcessShard(Shard):
    """One rank of a torch.distributed group (gloo or NCCL)."""

    def __init__(self, *, data_parallel: bool = False, timer: Optional[Breakdown] = None,
                 device: Optional[torch.device] = None, group=None):
        super().__init__(timer)
        if not dist.is_initialized():
            raise RuntimeError("ProcessShard needs an initialised process group (llmeasyquant.distributed.init())")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.data_parallel = data_parallel
        # NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones via staging)
        backend = dist.get_backend(group)
        self.comm_device = torch.device(device) if device is not None else torch.device("cpu")
        if backend == "nccl" and self.comm_device.type != "cuda":
            self.comm_device = torch.device("cuda", torch.cuda.current_device())

    def _object_device(self) -> Optional[torch.device]:
        """Where pickled objects are staged for a broadcast (NCCL needs the GPU)."""
        return self.comm_device if self.comm_device.type == "cuda" else None

    def _count(self, nbytes: int, sent: bool) -> None:
        if self.timer:
            if sent:
                self.timer.bytes_sent += nbytes
            else:
                self.timer.bytes_received += nbytes

    def local_batches(self, batches: list) -> list:
        if not self.data_parallel:
            return batches
        if len(batches) < self.world:
            raise ValueError(f"data-parallel calibration needs at least one batch per rank: {len(batches)} "
                             f"batch(es) for {self.world} ranks; raise the number of calibration samples")
        return list(batches[self.rank:: self.world])

    def reduce_stats_(self, stats: dict) -> None:
        """absmax/max: global max, min: global min; token samples: every rank's, in rank order."""
        if not self.data_parallel or not stats:
            return
        keys = sorted(stats)
        with self.phase("calibration", "comm"), collective("all-reduce activation statistics"):
            for field, op in (("absmax", dist.ReduceOp.MAX), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
                parts = [getattr(stats[k], field) for k in keys]
                flat = torch.cat([p.reshape(-1) for p in parts]).to(self.comm_device)
                dist.all_reduce(flat, op=op, group=self.group)
                self._count(flat.numel() * flat.element_size(), True)
                flat = flat.to(parts[0].device)
                off = 0
                for p in parts:
                    p.copy_(flat[off: off + p.numel()].view_as(p))
                    off += p.numel()
            for k in keys:
                if stats[k].samples is not None:
                    stats[k].samples = self._gather_rows(stats[k].samples)

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        dev = rows.device
        n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=self.comm_device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        most = int(max(s.item() for s in sizes))
        padded = torch.zeros(most, rows.shape[1], dtype=rows.dtype, device=self.comm_device)
        padded[: rows.shape[0]] = rows.to(self.comm_device)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        self._count(padded.numel() * padded.element_size(), True)
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)]).to(dev)

    def reduce_to_owner_(self, key: str, t: torch.Tensor) -> None:
        """Sum ``t`` over the ranks into the owner of ``key`` (data-parallel Hessians)."""
        if not self.data_parallel:
            return
        with self.phase(key, "comm"), collective(f"reduce statistics of {key}"):
            buf = t if t.device == self.comm_device else t.to(self.comm_device)
            dist.reduce(buf, dst=self.owner[key], group=self.group)
            self._count(buf.numel() * buf.element_size(), self.rank != self.owner[key])
            if buf is not t:
                t.copy_(buf)

    def share(self, key: str, value):
        """``value`` as computed by the owner of ``key`` (others pass anything)."""
        with self.phase(key, "comm"), collective(f"share result of {key}"):
            box = [value if self.owns(key) else None]
            dist.broadcast_object_list(box, src=self.owner[key], group=self.group, device=self._object_device())
            return box[0]

    def barrier(self, key: str) -> None:
        with self.phase(key, "sync"), collective(f"barrier after {key}"):
            dist.barrier(group=self.group)

    def gather_modules(self, root: nn.Module, names: Sequence[str], prefix: str = "") -> None:
        """Every rank ends with the owners' quantized modules at ``names``
        (paths under ``root``): per owner, one pickled header (layer specs,
        tensor layout) and one flat byte buffer with every tensor."""
        if self.world == 1:
            return  # nothing to send: this rank quantized everything itself
        full = {n: f"{prefix}.{n}" if prefix else n for n in names}
        for src in range(self.world):
            mine = [n for n in names if self.owner[full[n]] == src]
            if not mine:
                continue
            key = f"{prefix}.{mine[0]}" if prefix else mine[0]
            with self.phase(key, "comm"), collective(f"gather quantized layers {prefix or '<model>'} from rank {src}"):
                if self.rank == src:
                    header, payload = _pack([root.get_submodule(n) for n in mine], mine)
                    box = [header]
                else:
                    box = [None]
                dist.broadcast_object_list(box, src=src, group=self.group, device=self._object_device())
                header = box[0]
                nbytes = header["nbytes"]
                if self.rank == src:
                    buf = payload.to(self.comm_device)
                else:
                    buf = torch.empty(nbytes, dtype=torch.uint8, device=self.comm_device)
                dist.broadcast(buf, src=src, group=self.group)
                self._count(nbytes, self.rank == src)
                if self.rank != src:
                    _unpack(root, header, buf)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _pack(modules: list[nn.Module], names: list[str]) -> tuple[dict, torch.Tensor]:
    layers, chunks = [], []
    for name, mod in zip(names, modules):
        if not isinstance(mod, QLinear):
            raise TypeError(f"gather_modules: {name} is a {type(mod).__name__}, expected a QLinear "
                            "(the owner has not quantized it)")
        tensors = [(k, str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in mod.state_dict().items()]
        chunks += [_as_bytes(v) for v in mod.state_dict().values()]
        layers.append((name, mod.spec(), tensors))
    payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return {"layers": layers, "nbytes": int(payload.numel())}, payload.cpu()


def _unpack(root: nn.Module, header: dict, buf: torch.Tensor) -> None:
    from ..methods._common import swap

    off = 0
    for name, spec, tensors in header["layers"]:
        old = root.get_submodule(name)
        dev = next(iter(old.state_dict().values()), torch.empty(0)).device
        ql = QLinear.from_spec(spec, device=dev)
        state = {}
        for key, dtype, shape in tensors:
            dt = getattr(torch, dtype)
            n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dt).element_size()
            # clone: a view of another dtype needs an aligned storage offset
            state[key] = buf[off: off + n].clone().view(dt).reshape(shape).to(dev)
            off += n
        ql.load_state_dict(state)
        swap(root, name, ql)
    if off != buf.numel():
        raise RuntimeError(f"gather_modules: header describes {off} bytes, buffer has {buf.numel()}")
