"""The blockwise driver: every calibration-based method runs through it.

A decoder-only LM is a stack of identical blocks. The driver captures what the
first block receives for every calibration batch (hidden states plus the extra
arguments the model passes: masks, rotary embeddings, ...), then walks the
blocks in order. For each block it

1. asks the method which linear inputs to observe (``BlockHooks.observe``),
   runs the block over every batch with those observers attached;
2. lets the method do its work (``BlockHooks.quantize``: reduce statistics,
   search, fold, swap linears for QLinear), then makes every rank hold the
   same block (``Shard.barrier`` / ``Shard.gather_modules``);
3. runs the block to produce the next block's inputs.

A *sequential* method (GPTQ, AWQ) sees the inputs the already-quantized blocks
before it produce, so their errors are accounted for; its step 3 is a second
pass over the quantized block. A method whose work leaves the block's function
unchanged (SmoothQuant's folding, collecting Hessians of the float model) sets
``sequential = False``: steps 1 and 3 are one pass, so statistics cost one
forward, as a plain forward of the model would.

Mixture of experts: each expert is its own linears (``mlp.experts.3.up_proj``,
:mod:`llmeasyquant.models.experts`) called on the tokens routed to it, so an
observer of an expert linear sees exactly that expert's tokens. The driver
counts them per expert in the calibration pass (``BlockContext.tokens``);
experts that saw none are logged and listed in
``PipelineReport.unrouted_experts``, and the methods quantize them without
calibration statistics (round-to-nearest) rather than fail or divide by zero.

Memory: only one block's calibration activations are held at a time (its
inputs and the outputs being built); with ``device`` set, only the block being
processed is on that device, the rest of the model stays where it is (CPU),
and activations live on the model's device between blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import observe_model
from .log import logger
from .models.extract import ModelSpec
from .sharding import Shard

Observer = Callable[[torch.Tensor], None]  # sees a linear's input rows [tokens, K]


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """What a decoder block receives for each calibration batch."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]

    def nbytes(self) -> int:
        return sum(_nbytes(h) for h in self.hidden) + sum(_nbytes(a) + _nbytes(k)
                                                          for a, k in zip(self.args, self.kwargs))


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _to(obj, device: Optional[torch.device]):
    """``obj`` (tensors inside tuples/lists/dicts) on ``device``; None: unchanged."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[torch.Tensor]) -> BlockInputs:
    """Run the model up to its first decoder block and keep the block's inputs.
    The same extra arguments serve every block: that is how the model itself
    calls them."""
    seen = BlockInputs([], [], [])

    def grab(module, args, kwargs):
        seen.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        seen.args.append(tuple(args[1:]))
        seen.kwargs.append(dict(kwargs))
        raise _StopForward

    h = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        h.remove()
    return seen


def block_forward(block: nn.Module, inputs: BlockInputs, j: int, device: Optional[torch.device] = None):
    """Block output for batch ``j`` (computed on ``device`` when given)."""
    out = block(_to(inputs.hidden[j], device), *_to(inputs.args[j], device), **_to(inputs.kwargs[j], device))
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockContext:
    """One block as a method sees it."""

    index: int
    key: str  # full path of the block, e.g. "model.layers.3"
    block: nn.Module
    names: list[str]  # the block's linears (paths inside it) the method quantizes here (and the driver gathers)
    shard: Shard
    batches: int  # calibration batches over all ranks (data-parallel: the union)
    # MoE: routed tokens per expert of this block (path inside it -> rows), this rank's calibration pass
    tokens: dict[str, int] = field(default_factory=dict)
    # what this block receives for every calibration batch (sequential: from the quantized blocks
    # before it), for methods that run the block themselves (AutoRound); read-only
    inputs: Optional[BlockInputs] = None
    # where the block runs (None: where it is); a method moves what it feeds the block there
    device: Optional[torch.device] = None

    def path(self, name: str) -> str:
        return f"{self.key}.{name}"

    def module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    def assign(self, names: Sequence[str], costs: Sequence[float]) -> set[str]:
        """The names (of ``names``) this rank owns, work split by ``costs``."""
        full = {self.path(n): n for n in names}
        mine = self.shard.assign(list(full), list(costs))
        return {full[p] for p in mine}

    def assign_units(self, units: Sequence[Sequence[str]], costs: Sequence[float]) -> set[str]:
        """As :meth:`assign`, for units of names one rank handles together:
        the first names of the units this rank owns; every name of a unit
        gets the unit's owner (the driver gathers each name from it)."""
        mine = self.assign([u[0] for u in units], costs)
        for u in units:
            for n in u[1:]:
                self.shard.owner[self.path(n)] = self.shard.owner[self.path(u[0])]
        return mine


class BlockHooks:
    """What a blockwise method supplies; the driver calls, in this order per
    block: ``observe`` (which linear inputs to see, and how) and, after the
    calibration pass, ``quantize``."""

    desc = "quantizing"
    # True: the next block's inputs come from this block *after* quantize
    sequential = True

    def observe(self, ctx: BlockContext) -> dict[str, Observer]:
        return {}

    def quantize(self, ctx: BlockContext) -> None:
        pass


@dataclass
class PipelineReport:
    """What a blockwise run held and spent."""

    blocks: int = 0
    batches: int = 0
    device: str = "cpu"
    # calibration activations held at once by the driver: one block's inputs
    # (with their masks / rotary tables) plus the outputs being built
    peak_activation_bytes: int = 0
    seconds: dict = field(default_factory=lambda: {"capture": 0.0, "observe": 0.0, "quantize": 0.0, "forward": 0.0})
    # MoE: full paths of experts no calibration token was routed to (quantized round-to-nearest)
    unrouted_experts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = self.seconds
        out = (f"{self.blocks} blocks x {self.batches} batches on {self.device}; calibration activations held "
               f"at most {self.peak_activation_bytes / 2**20:.1f} MiB; capture {s['capture']:.1f} s, observe "
               f"{s['observe']:.1f} s, quantize {s['quantize']:.1f} s, forward {s['forward']:.1f} s")
        if self.unrouted_experts:
            out += (f"; {len(self.unrouted_experts)} experts saw no calibration token (round-to-nearest, no "
                    f"calibration): {', '.join(self.unrouted_experts)}")
        return out


def _observe_hooks(block: nn.Module, observers: dict[str, Observer]) -> list:
    return [block.get_submodule(n).register_forward_pre_hook(
        lambda m, args, fn=fn: fn(args[0].detach().reshape(-1, args[0].shape[-1]))) for n, fn in observers.items()]


def _count_hooks(block: nn.Module, experts: Sequence[str], tokens: dict[str, int]) -> list:
    """Count the rows each expert receives (its gate_proj's input: every expert has one)."""
    for e in experts:
        tokens[e] = 0

    def count(e, x):
        tokens[e] += x.reshape(-1, x.shape[-1]).shape[0]

    return [block.get_submodule(f"{e}.gate_proj").register_forward_pre_hook(
        lambda m, args, e=e: count(e, args[0])) for e in experts]


def _move(block: nn.Module, device: Optional[torch.device]) -> None:
    if device is not None:
        block.to(device)


@torch.no_grad()
def run_blocks(model: nn.Module, spec: ModelSpec, batches: Sequence[torch.Tensor], hooks: BlockHooks, *,
               targets: set[str], shard: Optional[Shard] = None, progress: bool = True,
               device: Optional[torch.device | str] = None) -> PipelineReport:
    """Walk the decoder blocks of ``model`` with ``hooks`` (see the module doc).

    ``targets``: full paths of the linears the method quantizes (each block's
    ``ctx.names`` are its share). ``device``: where each block runs while it
    is processed (None: where it is); it returns to the model's device after.
    """
    if not batches:
        raise ValueError(f"{hooks.desc}: the blockwise pass needs at least one calibration batch")
    shard = shard or Shard()
    device = torch.device(device) if device is not None else None
    home = next(model.parameters()).device
    if device is not None and device == home:
        device = None
    report = PipelineReport(blocks=len(spec.blocks), batches=len(batches), device=str(device or home))
    prefix = spec.arch.layers_path
    total_batches = len(batches) * (shard.world if shard.data_parallel else 1)
    t = time.perf_counter()
    inputs = capture_block_inputs(model, spec.blocks[0], batches)
    report.seconds["capture"] += time.perf_counter() - t
    for i, block in enumerate(tqdm(spec.blocks, desc=hooks.desc, disable=not progress)):
        key = f"{prefix}.{i}"
        ctx = BlockContext(i, key, block, [n for n in spec.linears_of(i) if f"{key}.{n}" in targets], shard,
                           total_batches, inputs=inputs, device=device)
        _move(block, device)
        try:
            observers = hooks.observe(ctx)
            t = time.perf_counter()
            outputs: list[torch.Tensor] = []
            # a sequential method that observes nothing in a block without experts (AutoRound: it runs
            # the block itself) needs no calibration pass
            calib_pass = bool(observers) or bool(spec.experts_of(i)) or not hooks.sequential
            with shard.phase(key, "calib"):
                handles = _observe_hooks(block, observers) + _count_hooks(block, spec.experts_of(i), ctx.tokens)
                try:
                    for j in range(len(inputs.hidden) if calib_pass else 0):
                        out = block_forward(block, inputs, j, device)
                        if not hooks.sequential:  # the observation pass is also the forward
                            outputs.append(_to(out, home) if device is not None else out)
                finally:
                    for h in handles:
                        h.remove()
            report.seconds["observe"] += time.perf_counter() - t
            unrouted = [e for e, n in ctx.tokens.items() if n == 0]
            if unrouted:
                logger.warning("%s: %s: %d of %d experts saw no calibration token (%s); they are quantized "
                               "round-to-nearest, without calibration statistics", hooks.desc, key, len(unrouted),
                               len(ctx.tokens), ", ".join(f"{key}.{e}" for e in unrouted))
                report.unrouted_experts += [f"{key}.{e}" for e in unrouted]
            t = time.perf_counter()
            hooks.quantize(ctx)
            if ctx.names:  # the same on every rank: all skip, or all meet
                shard.barrier(key)
                shard.gather_modules(block, ctx.names, key)
            report.seconds["quantize"] += time.perf_counter() - t
            if hooks.sequential:
                t = time.perf_counter()
                with shard.forward_times(block, key):
                    for j in range(len(inputs.hidden)):
                        out = block_forward(block, inputs, j, device)
                        outputs.append(_to(out, home) if device is not None else out)
                report.seconds["forward"] += time.perf_counter() - t
        finally:
            _move(block, home if device is not None else None)
        report.peak_activation_bytes = max(report.peak_activation_bytes,
                                           inputs.nbytes() + sum(_nbytes(o) for o in outputs))
        inputs.hidden = outputs
    return report


@torch.no_grad()
def observe_blocks(model: nn.Module, spec: ModelSpec, batches: Sequence[torch.Tensor], paths: Sequence[str],
                   on_input: Callable[[str, torch.Tensor], None], *, desc: str = "calibrating",
                   progress: bool = True, shard: Optional[Shard] = None) -> PipelineReport:
    """Statistics of the float model, block by block in one pass:
    ``on_input(path, x)`` sees the input rows ``x [tokens, K]`` of every
    decoder-block linear at ``paths`` (paths outside the blocks: ValueError,
    collect those with :func:`llmeasyquant.calibration.observe_model`)."""
    inside = set(spec.linear_paths())
    outside = [p for p in paths if p not in inside]
    if outside:
        raise ValueError(f"observe_blocks: {outside[:3]} are not linears of the decoder blocks")
    wanted = set(paths)

    class _Observe(BlockHooks):
        sequential = False

        def observe(self, ctx: BlockContext) -> dict[str, Observer]:
            names = [n for n in spec.linears_of(ctx.index) if ctx.path(n) in wanted]
            return {n: (lambda x, p=ctx.path(n): on_input(p, x)) for n in names}

    _Observe.desc = desc
    return run_blocks(model, spec, batches, _Observe(), targets=set(), shard=shard, progress=progress)


def observe_linears(model: nn.Module, spec: ModelSpec, paths: Sequence[str], batches: Sequence[torch.Tensor],
                    on_input: Callable[[str, torch.Tensor], None], *, desc: str = "calibrating",
                    progress: bool = True) -> None:
    """Float-model statistics of any linears: those inside the decoder blocks
    block by block (:func:`observe_blocks`), any others (a projection before
    the blocks, an LM head not excluded) from one whole-model pass."""
    inside = set(spec.linear_paths())
    in_blocks = [p for p in paths if p in inside]
    outside = [p for p in paths if p not in inside]
    if in_blocks:
        observe_blocks(model, spec, batches, in_blocks, on_input, desc=desc, progress=progress)
    if outside:
        observe_model(model, outside, batches, lambda p, x: on_input(p, x.reshape(-1, x.shape[-1])),
                      f"{desc} (outside the blocks)", progress)
