"""What extraction finds in a model, as a report (``llmeasyquant info --arch``):
blocks, linears, scale groups declared and discovered, fused projections,
SimQuant and tensor-parallel support."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .archs import FusedLinear, ScaleGroup
from .extract import extract


@dataclass
class ArchReport:
    model_type: str
    source: str  # "declared" (+ variant) or "generic fallback"
    layers_path: str
    blocks: int
    linears: tuple[str, ...]
    extra_linears: list[str]
    declared_groups: Optional[tuple[ScaleGroup, ...]]  # None: not a declared architecture
    discovered_groups: tuple[ScaleGroup, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # discovered candidates that failed verification
    fused: tuple[FusedLinear, ...] = ()
    final: tuple[str, ...] = ()
    kv: str = ""
    tp: str = ""
    representative: str = ""
    moe: list[str] = field(default_factory=list)  # lines about the experts (MoE architectures)


def describe(model: nn.Module) -> ArchReport:
    """Extraction's view of ``model``. The discovery runs on declared
    architectures too (one random batch), so the two can be compared."""
    spec = extract(model)
    arch = spec.arch
    found = spec.discovery
    source = "declared" + (f" ({arch.variant})" if arch.variant else "") if arch.declared else "generic fallback"
    tp = (f"columns {', '.join(arch.tp.columns)}; rows {', '.join(arch.tp.rows)}" if arch.tp is not None
          else "no layout declared")
    name = arch.representative or spec.block_linears[-1]
    moe = []
    if arch.moe is not None:
        sparse = [i for i in range(len(spec.blocks)) if spec.experts_of(i)]
        n = len(spec.experts_of(sparse[0])) if sparse else 0
        moe = [f"experts: {n} per MoE block in blocks {', '.join(map(str, sparse))} at {arch.moe.experts} "
               f"(router {arch.moe.router}, float), one linear per expert projection, each calibrated on its "
               f"routed tokens",
               f"MoE block linears: {', '.join(spec.linears_of(sparse[0]) if sparse else ())}",
               f"kept float: {', '.join((arch.moe.router,) + arch.moe.float_linears)}"]
    return ArchReport(moe=moe, model_type=spec.model_type, source=source, layers_path=arch.layers_path,
                      blocks=len(spec.blocks), linears=spec.block_linears, extra_linears=list(spec.extra_linears),
                      declared_groups=spec.declared_groups, discovered_groups=found.groups, skipped=found.skipped,
                      fused=arch.fused, final=arch.final, kv=arch.kv.describe(), tp=tp,
                      representative=f"{arch.layers_path}.{len(spec.blocks) // 2}.{name}")


def format_report(r: ArchReport) -> str:
    lines = [f"model type {r.model_type}: {r.source}",
             f"  decoder blocks: {r.blocks} at {r.layers_path}",
             f"  linears per block: {', '.join(r.linears)}",
             f"  other linears: {', '.join(r.extra_linears) or 'none'}",
             f"  after the blocks: {', '.join(r.final) or 'nothing declared'}"]
    if r.declared_groups is not None:
        lines.append("  scale groups (declared, used):")
        lines += [f"    {g.describe()}" for g in r.declared_groups] or ["    none"]
        lines.append("  norm -> linear groups the generic fallback would discover (not used):")
    else:
        lines.append("  scale groups (discovered, verified by exact folding, used):")
    lines += [f"    {g.describe()}" for g in r.discovered_groups] or ["    none"]
    lines += [f"    skipped {c}: {why}" for c, why in r.skipped]
    lines.append("  fused projections: " + ("; ".join(f"{f.path} = {' + '.join(f.parts)} ({f.layout})"
                                                      for f in r.fused) or "none"))
    lines += [f"  {m}" for m in r.moe]
    lines += [f"  SimQuant KV cache: {r.kv}", f"  tensor parallelism: {r.tp}",
              f"  representative layer (plots): {r.representative}"]
    return "\n".join(lines)
