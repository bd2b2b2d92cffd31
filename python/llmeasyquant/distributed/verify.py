"""Check that every rank holds the identical quantized model (paper Theorem
B.21, checked rather than assumed): a SHA-256 of every tensor of the model's
state, compared across ranks."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from .runtime import PeerFailure, collective


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + data).hexdigest()[:16]


def model_digests(model: nn.Module) -> dict[str, str]:
    """name -> digest of every tensor of ``model.state_dict()`` (quantized
    weights, scales, zero-points, and the float tensors smoothing changed)."""
    return {k: tensor_digest(v) for k, v in model.state_dict().items()}


def check_consistent(model: nn.Module, group=None) -> dict[str, str]:
    """All-gather the digests; raise :class:`PeerFailure` naming the tensors
    that differ between ranks. Returns this rank's digests."""
    mine = model_digests(model)
    world = dist.get_world_size(group)
    with collective("all-gather model checksums"):
        everyone = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
    bad = sorted({k for d in everyone for k in set(d) | set(mine) if d.get(k) != mine.get(k)})
    if bad:
        raise PeerFailure(f"ranks disagree on {len(bad)} tensor(s) of the quantized model, e.g. {bad[:5]}")
    return mine


def setup_digest(parts: dict) -> dict[str, str]:
    """key -> short digest of each part of a run's setup (JSON-able values,
    tensors and lists of tensors hashed by content)."""
    import json

    def digest(v) -> str:
        if isinstance(v, torch.Tensor):
            return tensor_digest(v)
        if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
            return hashlib.sha256("".join(tensor_digest(t) for t in v).encode()).hexdigest()[:16]
        return hashlib.sha256(json.dumps(v, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    return {k: digest(v) for k, v in parts.items()}


def check_same_setup(parts: dict, group=None) -> None:
    """Before any work: every rank was started with the same method, options,
    calibration data and model config, or :class:`PeerFailure` names what
    differs (otherwise the ranks would silently build one mixed model)."""
    mine = setup_digest(parts)
    world = dist.get_world_size(group)
    with collective("all-gather the run setup"):
        everyone = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
    bad = sorted({k for d in everyone for k in mine if d.get(k) != mine[k]})
    if bad:
        ranks = [r for r, d in enumerate(everyone) if d != everyone[0]]
        raise PeerFailure(f"the ranks were started with different settings ({', '.join(bad)} differ; ranks "
                          f"{ranks} disagree with rank 0): start every rank with the same command")
