"""One entry point: ``quantize(model, method_or_config, calib=...)``."""

from __future__ import annotations

import importlib

import torch
from torch import nn

import time

from .calibration import calibration_batches
from .log import logger
from .sharding import Shard
from .methods.base import QuantConfig, config_for
from .models.extract import extract

# method name -> module in llmeasyquant.methods with apply(model, spec, config, calib, progress)
_METHOD_MODULES = {
    "absmax": "rtn",
    "zeropoint": "rtn",
    "zeroquant": "rtn",
    "smoothquant": "smoothquant",
    "gptq": "gptq_method",
    "awq": "awq_method",
    "simquant": "simquant",  # KV cache only; weights stay float
    "mixed": "mixed",  # per-layer bit widths (llmeasyquant.search)
}
_NEEDS_CALIBRATION = {"smoothquant", "gptq", "awq"}


def _calibration(config: QuantConfig, calib, tokenizer) -> list[torch.Tensor]:
    if calib is not None and not isinstance(calib, (str, list, tuple)):
        raise TypeError(f"calib must be a file path, a list of strings or a list of token tensors, got {type(calib)}")
    if isinstance(calib, (list, tuple)) and calib and isinstance(calib[0], torch.Tensor):
        return [c if c.dim() == 2 else c.unsqueeze(0) for c in calib]
    if isinstance(calib, (list, tuple)) and not calib:
        raise ValueError("calibration set is empty")
    if tokenizer is None:
        raise ValueError(f"{config.method} needs calibration data: pass tokenizer= (to tokenize text) "
                         "or calib= as a list of token tensors")
    return calibration_batches(tokenizer, calib, n_samples=config.n_calib, seq_len=config.calib_seq_len)


@torch.no_grad()
def quantize(model: nn.Module, method_or_config: str | QuantConfig = "smoothquant", calib=None, *,
             tokenizer=None, progress: bool = True, shard=None, **options) -> nn.Module:
    """Quantize a Hugging Face causal LM in place and return it.

    ``method_or_config``: a method name (``absmax``, ``zeropoint``, ``zeroquant``,
    ``smoothquant``, ``gptq``, ``awq``) with ``options`` overriding its config
    fields, or a config object. ``calib``: a text file, a list of strings, or a
    list of token-id tensors; default WikiText-2 validation (needs
    ``tokenizer``). Linears named in ``exclude`` (default ``lm_head``) stay float.
    ``shard``: a :class:`llmeasyquant.distributed.ProcessShard` to split the
    work over torch.distributed ranks (see :func:`llmeasyquant.distributed.quantize`);
    every rank ends with the same quantized model.
    """
    if isinstance(method_or_config, QuantConfig):
        if options:
            raise ValueError("pass options either in the config object or as keywords, not both")
        config = method_or_config
    else:
        config = config_for(method_or_config, **options)
    spec = extract(model)
    needs = (config.method in _NEEDS_CALIBRATION or config.act == "static"
             or getattr(config, "base", None) == "gptq")
    batches = _calibration(config, calib, tokenizer) if needs else []
    shard = shard or Shard()
    if needs:
        # every rank tokenizes the same windows (seeded); data-parallel keeps its share
        batches = shard.local_batches(batches)
    module = importlib.import_module(f".methods.{_METHOD_MODULES[config.method]}", __package__)
    was_training = model.training
    model.eval()
    logger.info("%s: %s on a %s model (%d decoder blocks), %d calibration batch(es)%s", config.method,
                config.describe(), spec.model_type, len(spec.blocks), len(batches),
                "" if shard.world == 1 else f", rank {shard.rank} of {shard.world}")
    t0 = time.perf_counter()
    module.apply(model, spec, config, batches, progress=progress, shard=shard)
    logger.info("%s: done in %.1f s", config.method, time.perf_counter() - t0)
    model.train(was_training)
    model.llmeq_config = config
    return model
