"""Distributed quantization on torch.distributed (NCCL on GPUs, gloo over TCP on CPU).

* :func:`quantize` - any method, with the layers (and scale searches) spread
  over the ranks and the quantized tensors all-gathered, so every rank ends
  with the identical model; optional data-parallel calibration with global
  statistics (max / min / Hessian sums).
* :mod:`.tensor_parallel` - column- and row-parallel QLinear (Megatron layout).
* :class:`.ema_sync.EMASync` - keeps online (EMA) activation scales equal across ranks.
* :mod:`.timing` - the per-layer time breakdown (paper eq. 12).

Start ranks with ``torchrun``: ``torchrun --nproc_per_node 2 -m
llmeasyquant.distributed quantize smollm2-135m --method gptq --out q/``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .runtime import DEFAULT_TIMEOUT_S, LaunchError, PeerFailure, collective, init, pick_backend, shutdown
from ..sharding import Shard, partition
from .shard import ProcessShard
from .timing import PHASES, Breakdown, format_table
from .verify import check_consistent, check_same_setup, model_digests


def _file_identity(path: str) -> dict:
    import os

    try:
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": path}


def quantize(model: nn.Module, method_or_config="smoothquant", calib=None, *, tokenizer=None,
             data_parallel: bool = False, timer: Optional[Breakdown] = None, verify: bool = True,
             progress: bool = True, group=None, **options) -> nn.Module:
    """:func:`llmeasyquant.quantize` over the ranks of an initialised process group.

    Every rank passes the same float model. Layers are partitioned across
    ranks (largest first, balanced); each rank quantizes its part and the
    results are all-gathered. ``data_parallel=False`` (default): every rank
    runs the calibration forwards over all the data, so the result is
    bit-identical to one process. ``data_parallel=True``: each rank calibrates
    on 1/P of the batches and the statistics are combined (max/min exact,
    Hessian sums up to float64 summation order; SmoothQuant/AWQ searches see the
    union of the ranks' sampled tokens). ``verify``: compare checksums of every
    tensor across ranks at the end.
    """
    from ..api import quantize as _quantize
    from ..methods.base import QuantConfig, config_for

    config = method_or_config if isinstance(method_or_config, QuantConfig) else config_for(method_or_config,
                                                                                           **options)
    check_same_setup({"method and options": config.to_dict(), "data_parallel": data_parallel,
                      "calibration data": calib if not isinstance(calib, str) else _file_identity(calib),
                      "model config": model.config.to_dict() if hasattr(model, "config") else repr(model)},
                     group)
    device = next(iter(model.parameters())).device
    shard = ProcessShard(data_parallel=data_parallel, timer=timer, device=device, group=group)
    _quantize(model, method_or_config, calib, tokenizer=tokenizer, progress=progress and shard.rank == 0,
              shard=shard, **options)
    if verify:
        check_consistent(model, group)
    return model


__all__ = ["Breakdown", "DEFAULT_TIMEOUT_S", "LaunchError", "PHASES", "PeerFailure", "ProcessShard", "Shard", "check_consistent",
           "collective", "format_table", "init", "model_digests", "partition", "pick_backend", "quantize",
           "shutdown"]
