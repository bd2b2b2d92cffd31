"""Process groups: torch.distributed with NCCL on CUDA and gloo (TCP) on CPU.

Ranks are started by ``torchrun`` (single node or ``--nnodes``), which sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; tests start them
on 127.0.0.1 themselves. No transport of our own: every byte moves through
torch.distributed collectives.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist

BACKENDS = ("auto", "nccl", "gloo")
# A collective waits this long for a stuck peer before failing (a dead peer's
# closed sockets usually fail it much sooner).
DEFAULT_TIMEOUT_S = 300.0


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or disagreed."""


class LaunchError(RuntimeError):
    """This process was not started as a rank (no torchrun environment) or cannot be one."""


def pick_backend(backend: str = "auto", device: Optional[torch.device | str] = None) -> str:
    """``auto``: NCCL when the ranks run on CUDA devices (and NCCL is built),
    gloo otherwise (CPU, or CUDA without NCCL)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    dev = torch.device(device) if device is not None else None
    if backend == "nccl":
        if not (dist.is_nccl_available() and torch.cuda.is_available()):
            raise ValueError("backend 'nccl' needs CUDA GPUs and a torch built with NCCL; use 'gloo' on CPU")
        return "nccl"
    if backend == "gloo":
        return "gloo"
    on_cuda = dev is not None and dev.type == "cuda"
    return "nccl" if on_cuda and dist.is_nccl_available() else "gloo"


def _env_int(name: str) -> int:
    v = os.environ.get(name)
    if v is None:
        raise LaunchError(
            f"{name} is not set: start the ranks with torchrun, e.g. "
            "`torchrun --nproc_per_node 2 -m llmeasyquant.distributed quantize ...` "
            "(or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself)")
    try:
        return int(v)
    except ValueError as err:
        raise LaunchError(f"{name}={v!r} is not an integer") from err


def init(backend: str = "auto", *, device: Optional[str] = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[str, torch.device]:
    """Join the process group described by the environment (torchrun's).

    ``device``: ``cpu``, ``cuda`` (each rank takes ``cuda:LOCAL_RANK``) or
    None (CUDA when present). Returns (backend, this rank's device).
    """
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise LaunchError(f"rank {rank}: LOCAL_RANK={local} but this node has "
                               f"{torch.cuda.device_count()} GPU(s); start at most that many ranks per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    chosen = pick_backend(backend, dev)
    if not dist.is_initialized():
        dist.init_process_group(chosen, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if chosen == "nccl" else None)
    return chosen, dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective into one clear error naming this rank and the step."""
    try:
        yield
    except PeerFailure:
        raise
    except Exception as err:  # gloo/NCCL raise RuntimeError / DistBackendError / DistNetworkError
        rank = dist.get_rank() if dist.is_initialized() else -1
        world = dist.get_world_size() if dist.is_initialized() else -1
        raise PeerFailure(f"rank {rank} of {world}: collective '{what}' failed: another rank probably died or "
                          f"is stuck (collectives time out after the process group's timeout). "
                          f"Cause: {type(err).__name__}: {err}") from err
