"""Per-layer time breakdown of a quantization run (paper eq. 12):

    T_total = T_load + T_quant + T_gemm + T_comm + T_sync

with one more term, ``calib``: the forward passes over the calibration data
that collect statistics / Hessians (eq. 12 folds it into T_quant; it is the
part data-parallel calibration divides, so we keep it apart).

* load  - fetching a layer's float weight for its quantizer (dtype/device copy)
* calib - block forwards over calibration data collecting what methods need
* quant - the method's own arithmetic for the layers this rank owns
* gemm  - forwards of the quantized layers (the next block's inputs)
* comm  - sending/receiving quantized tensors, scales, statistics
* sync  - waiting at the barrier for the slowest rank (load imbalance)

On CUDA each phase is bracketed by a device synchronize (so kernel time lands
in the right phase), an NVTX range and a ``torch.profiler`` label
(``llmeq/<phase>``), so Nsight Systems and the profiler show the same split.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Optional

import torch
from torch import nn

from ..sharding import PHASES  # noqa: F401  (re-exported)


class Breakdown:
    def __init__(self, device: Optional[torch.device] = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
        self.bytes_sent = 0
        self.bytes_received = 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, key: str, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {PHASES}")
        self._sync()
        nvtx = torch.cuda.nvtx.range(f"llmeq/{name}/{key}") if self.cuda else contextlib.nullcontext()
        with nvtx, torch.profiler.record_function(f"llmeq/{name}"):
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._sync()
                self.seconds[key][name] += time.perf_counter() - t0

    @contextlib.contextmanager
    def forward_times(self, root: nn.Module, prefix: str, types: tuple[type, ...]) -> Iterator[None]:
        """Time every forward of ``root``'s submodules of ``types`` as ``gemm``
        (keyed ``prefix.name``) while the context is open."""
        hooks, starts = [], {}
        for name, mod in root.named_modules():
            if isinstance(mod, types):
                key = f"{prefix}.{name}" if prefix else name

                def pre(m, args, key=key):
                    self._sync()
                    starts[key] = time.perf_counter()

                def post(m, args, out, key=key):
                    self._sync()
                    self.seconds[key]["gemm"] += time.perf_counter() - starts.pop(key)

                hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def by_block(self, layers_path: str) -> dict[str, dict[str, float]]:
        """Sum the per-linear rows into one row per decoder block (``layers_path.i``)."""
        rows: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
        for key, phases in self.seconds.items():
            row = key
            if key.startswith(layers_path + "."):
                row = ".".join(key.split(".")[: len(layers_path.split(".")) + 1])
            for p, v in phases.items():
                rows[row][p] += v
        return dict(rows)

    def totals(self) -> dict[str, float]:
        t = dict.fromkeys(PHASES, 0.0)
        for phases in self.seconds.values():
            for p, v in phases.items():
                t[p] += v
        return t


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """Markdown table, seconds per phase per row, with a total row."""
    head = "| layer | " + " | ".join(f"{p} s" for p in PHASES) + " | total s |"
    lines = ([f"{title}", ""] if title else []) + [head, "|---" * (len(PHASES) + 2) + "|"]
    total = dict.fromkeys(PHASES, 0.0)

    def order(k: str):
        parts = k.split(".")
        return (0, int(parts[-1]), k) if parts[-1].isdigit() else (1, 0, k)

    for key in sorted(rows, key=order):
        ph = rows[key]
        for p in PHASES:
            total[p] += ph[p]
        lines.append(f"| {key} | " + " | ".join(f"{ph[p]:.3f}" for p in PHASES) + f" | {sum(ph.values()):.3f} |")
    lines.append("| **all** | " + " | ".join(f"{total[p]:.3f}" for p in PHASES)
                 + f" | {sum(total.values()):.3f} |")
    return "\n".join(lines)
