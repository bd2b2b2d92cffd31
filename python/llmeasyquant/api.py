"""One entry point: ``quantize(model, method_or_config, calib=...)``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .calibration import GENERATED, batches_from
from .log import logger
from .methods import QuantConfig, config_for, method_for
from .models.extract import extract
from .models.rotate import ensure_rotated
from .peak_memory import PeakMemory, measure_peak
from .pipeline import PipelineReport
from .sharding import Shard


def _calibration(config: QuantConfig, calib, tokenizer, model: nn.Module, shard) -> list[torch.Tensor]:
    if isinstance(calib, str) and calib == GENERATED:
        if tokenizer is None:
            raise ValueError(f"{config.method}: calib='generated' needs tokenizer= (to pick the first tokens)")
        if shard.world > 1:
            # ranks sampling on their own could draw different text; one process must write it for all
            raise ValueError("calib='generated' is not supported across ranks: generate once with "
                             "llmeasyquant.calibration.generated_batches and pass the token tensors as calib=")
    elif calib is not None and not isinstance(calib, (str, list, tuple)):
        raise TypeError(f"calib must be a file path, a list of strings or a list of token tensors, got {type(calib)}")
    if isinstance(calib, (list, tuple)) and calib and isinstance(calib[0], torch.Tensor):
        return [c if c.dim() == 2 else c.unsqueeze(0) for c in calib]
    if isinstance(calib, (list, tuple)) and not calib:
        raise ValueError("calibration set is empty")
    if tokenizer is None:
        raise ValueError(f"{config.method} needs calibration data: pass tokenizer= (to tokenize text) "
                         "or calib= as a list of token tensors")
    return batches_from(calib, tokenizer, model, n_samples=config.n_calib, seq_len=config.calib_seq_len)


@dataclass
class QuantizeReport:
    """What one ``quantize`` call did and held (``model.llmeq_report``; not saved)."""

    method: str
    description: str
    seconds: float
    calibration_batches: int
    memory: PeakMemory
    pipeline: Optional[PipelineReport] = None  # blockwise methods: activations held, time per stage

    def summary(self) -> str:
        s = f"{self.description}: {self.seconds:.1f} s, {self.memory.summary()}"
        return s + (f"; {self.pipeline.summary()}" if self.pipeline is not None else "")


def _quantize_lm_head(model: nn.Module, mode: str) -> None:
    """``QuantConfig.lm_head``: the output head (still float: the config
    keeps it in exclude) becomes an 8-bit weight-only QLinear (RTN), in groups
    of 64 inputs where 64 divides them (per channel otherwise): on the default
    model per-channel scales cost +0.09 % perplexity over the float head and
    groups of 64 nothing measurable (docs/results.md, 2026-12-03)."""
    from .methods._common import swap
    from .nn.qlinear import QLinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    path = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if path is None or not isinstance(head, nn.Linear):
        raise ValueError(f"quantize: lm_head={mode!r}, but {type(model).__name__} has no nn.Linear output head "
                         f"(get_output_embeddings() gave {type(head).__name__})")
    group = 64 if head.in_features % 64 == 0 else -1
    swap(model, path, QLinear.from_linear(head, w_bits=8, w_group_size=group, act=None))


@torch.no_grad()
def quantize(model: nn.Module, method_or_config: str | QuantConfig = "smoothquant", calib=None, *,
             tokenizer=None, progress: bool = True, shard=None, device=None, **options) -> nn.Module:
    """Quantize a Hugging Face causal LM in place and return it.

    ``method_or_config``: a method name (``llmeasyquant.available_methods()``:
    ``absmax``, ``zeropoint``, ``zeroquant``, ``smoothquant``, ``gptq``,
    ``awq``, ``simquant``, ``mixed``, and any registered with
    ``llmeasyquant.methods.register_method``) with ``options`` overriding its
    config fields, or a config object. ``calib``: a text file, a list of
    strings, a list of token-id tensors, or ``"generated"`` (text the float
    model samples itself, :func:`llmeasyquant.calibration.generated_batches`:
    no data needed, and less fitted to one kind of text); default WikiText-2
    validation (needs ``tokenizer``). Linears named in ``exclude`` (default ``lm_head``)
    stay float. ``shard``: a :class:`llmeasyquant.distributed.ProcessShard` to
    split the work over torch.distributed ranks (see
    :func:`llmeasyquant.distributed.quantize`); every rank ends with the same
    quantized model. ``device``: where blockwise methods (GPTQ, AWQ,
    SmoothQuant) run each decoder block, one at a time, while the model stays
    where it is (e.g. a model on the CPU quantized on ``"cuda"``); default:
    where the model is. ``model.llmeq_report`` tells the time and peak memory.
    """
    if isinstance(method_or_config, QuantConfig):
        if options:
            raise ValueError("pass options either in the config object or as keywords, not both")
        config = method_or_config
    else:
        config = config_for(method_or_config, **options)
    method = method_for(config.method)
    spec = extract(model)
    shard = shard or Shard()
    needs = method.needs_calibration(config)
    # before the rotation: text the model generates comes from the model as given
    batches = _calibration(config, calib, tokenizer, model, shard) if needs else []
    if ensure_rotated(model, config.rotate, spec, seed=config.rotate_seed, online=config.rotate_online,
                      who=config.method):
        spec = extract(model)  # the folds the rotation leaves
    if needs:
        # every rank tokenizes the same windows (seeded); data-parallel keeps its share
        batches = shard.local_batches(batches)
    was_training = model.training
    model.eval()
    logger.info("%s: %s on a %s model (%d decoder blocks), %d calibration batch(es)%s", config.method,
                config.describe(), spec.model_type, len(spec.blocks), len(batches),
                "" if shard.world == 1 else f", rank {shard.rank} of {shard.world}")
    on_cuda = device is not None and torch.device(device).type == "cuda" or any(
        p.is_cuda for p in model.parameters())
    t0 = time.perf_counter()
    with measure_peak(cuda=on_cuda) as peak:
        result = method.apply(model, spec, config, batches, progress=progress, shard=shard, device=device)
        if config.lm_head is not None:
            _quantize_lm_head(model, config.lm_head)
    report = QuantizeReport(config.method, config.describe(), time.perf_counter() - t0, len(batches), peak,
                            result if isinstance(result, PipelineReport) else None)
    logger.info("%s: done; %s", config.method, report.summary())
    model.train(was_training)
    model.llmeq_config = config
    model.llmeq_report = report
    return model
