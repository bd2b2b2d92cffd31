"""``llmeasyquant demo``: one real linear of a model swapped for QLinear
(W8A8 dynamic, W8A16, W4A16 g64), measured on the input it really sees.

For each variant: the relative output error on that input, the next-token
agreement of the whole model with only this layer swapped, the bytes held and
the median time of the layer alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

# (label, QLinear.from_linear options)
VARIANTS = (("W8A8 dynamic", dict(act="dynamic")),
            ("W8A16", dict(act=None)),
            ("W4A16 g64", dict(act=None, w_bits=4, w_group_size=64)))


@dataclass
class DemoRow:
    label: str
    rel_error: float  # ||QLinear(x) - Linear(x)|| / ||Linear(x)||
    top1_agree: float  # share of positions whose next-token argmax is unchanged
    nbytes: int
    ms: float


@dataclass
class DemoResult:
    layer: str  # full path of the linear in the model
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]
    tokens: int
    text_path: str
    float_weight_numel: int
    float_ms: float
    reps: int
    threads: int
    rows: list[DemoRow] = field(default_factory=list)


def find_projection(proj: str, block_linears: tuple[str, ...], where: str) -> str:
    """The path of ``proj`` inside a decoder block: a path of one of its
    linears (``mlp.down_proj``) or a last component that names exactly one of
    them (``down_proj``; GPT-2's ``c_proj`` is both attn's and mlp's)."""
    if proj in block_linears:
        return proj
    hits = [p for p in block_linears if p.rsplit(".", 1)[-1] == proj]
    if len(hits) != 1:
        why = "is ambiguous" if hits else "is not there"
        raise ValueError(f"projection {proj!r} {why} in {where}: expected one of its linears "
                         f"{', '.join(block_linears)}, got {proj!r}")
    return hits[0]


def _block(model: nn.Module, layer: int) -> tuple[nn.Module, str, tuple[str, ...]]:
    """(decoder block ``layer``, the path of the blocks, the block's linears),
    found by extraction so that any known architecture works."""
    from .models.extract import extract

    spec = extract(model)
    n = len(spec.blocks)
    if not 0 <= layer < n:
        raise ValueError(f"layer must be in [0, {n - 1}] ({n} decoder blocks at {spec.arch.layers_path}), "
                         f"got {layer}")
    return spec.blocks[layer], spec.arch.layers_path, spec.block_linears


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@torch.no_grad()
def run_demo(model: nn.Module, tokenizer, *, text_path: Optional[str] = None, tokens: int = 512, layer: int = 3,
             proj: str = "mlp.down_proj", reps: int = 20) -> DemoResult:
    """Swap the linear ``proj`` of decoder block ``layer`` for each of
    :data:`VARIANTS` in turn and measure it on the first ``tokens`` tokens of
    ``text_path`` (default: WikiText-2 validation). ``model`` is a float model
    of an architecture :func:`llmeasyquant.models.extract.extract` knows; it is
    left as it was. Times are medians of ``reps`` runs."""
    import llmeasyquant as lq

    from .bench import median_ms
    from .data import default_calib_file, read_text

    if tokens < 1 or reps < 1:
        raise ValueError(f"tokens and reps must be >= 1, got tokens={tokens}, reps={reps}")
    text_path = text_path or default_calib_file()
    ids = tokenizer(read_text(text_path, max_chars=20000), return_tensors="pt").input_ids[:, :tokens]
    block, layers_path, linears = _block(model, layer)
    path = find_projection(proj, linears, f"{layers_path}.{layer}")
    lin = block.get_submodule(path)
    if isinstance(lin, lq.QLinear):
        raise ValueError(f"{layers_path}.{layer}.{path}: expected a float linear, got a QLinear "
                         "(the demo quantizes a float model)")
    seen = {}
    hook = lin.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    try:
        base_logits = model(ids).logits
    finally:
        hook.remove()
    x, y = seen["x"], seen["y"]
    x2 = x.reshape(-1, x.shape[-1])
    res = DemoResult(layer=f"{layers_path}.{layer}.{path}", in_features=x.shape[-1], out_features=y.shape[-1],
                     input_shape=tuple(x.shape), tokens=ids.shape[1], text_path=text_path,
                     float_weight_numel=lin.weight.numel(), float_ms=median_ms(lambda: lin(x2), reps), reps=reps,
                     threads=torch.get_num_threads())
    for label, cfg in VARIANTS:
        q = lq.QLinear.from_linear(lin, **cfg)
        rel = _rel_error(q(x), y)
        t = median_ms(lambda: q(x2), reps)
        block.set_submodule(path, q)
        try:
            logits = model(ids).logits
        finally:
            block.set_submodule(path, lin)
        agree = (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
        res.rows.append(DemoRow(label, rel, agree, q.memory_bytes(), t))
    return res


def format_demo(r: DemoResult) -> str:
    """The demo's report: the layer, the table (sizes against fp16 storage), a legend."""
    fp16_bytes = r.float_weight_numel * 2
    lines = [f"layer {r.layer}: {r.in_features} -> {r.out_features}, real input {r.input_shape} "
             f"from {r.tokens} tokens of {os.path.basename(r.text_path)}",
             "",
             f"{'QLinear':<14} {'rel. error':>10} {'top-1 agree':>11} {'bytes':>10} {'vs fp16':>8} "
             f"{'ms':>7} {'speed-up':>8}",
             f"{'fp32 Linear':<14} {0:>10.4f} {1:>11.3f} {r.float_weight_numel * 4:>10,} {'2.00x':>8} "
             f"{r.float_ms:>7.3f} {'1.00x':>8}"]
    for row in r.rows:
        lines.append(f"{row.label:<14} {row.rel_error:>10.4f} {row.top1_agree:>11.3f} {row.nbytes:>10,} "
                     f"{row.nbytes / fp16_bytes:>7.2f}x {row.ms:>7.3f} {r.float_ms / row.ms:>7.2f}x")
    lines += ["",
              f"(rel. error: ||QLinear(x) - Linear(x)|| / ||Linear(x)|| on the real input; top-1 agree: "
              f"next-token argmax of the whole model with this one layer swapped; ms: median of {r.reps} "
              f"runs on {r.threads} threads)"]
    return "\n".join(lines)
