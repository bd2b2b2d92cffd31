"""Save and load quantized models: a self-contained folder with

* ``model.safetensors`` — every tensor of the model (packed integer weights,
  scales, zero-points, activation state, the float rest), no pickle;
* ``quantization.json`` — format version, library version, the method config,
  and one entry per QLinear (its constructor arguments), plus the KV-cache
  config for SimQuant;
* ``config.json`` (+ generation config) — the base model's transformers config;
* the tokenizer files, when a tokenizer is given.

Writes go to a temporary folder that is renamed into place, so an interrupted
save never leaves a half-written model folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from torch import nn

from .nn.qlinear import QLinear

FORMAT = "llmeasyquant"
# 2: 2- and 3-bit weights packed as bit streams (version 1 kept them in the 4-bit container)
FORMAT_VERSION = 2
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


def _library_version() -> str:
    from ._native import build_info

    return build_info()["version"]


def save(model: nn.Module, path: str, tokenizer=None) -> str:
    """Write ``model`` (quantized by :func:`llmeasyquant.quantize`, or any HF
    causal LM holding QLinear layers) to the folder ``path`` (replaced if it
    exists). Returns ``path``."""
    from safetensors.torch import save_model

    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise TypeError(f"save: expected a transformers model (with .config), got {type(model).__name__}")
    layers = {name: m.spec() for name, m in model.named_modules() if isinstance(m, QLinear)}
    kv = getattr(model, "llmeq_kv_config", None)
    cfg = getattr(model, "llmeq_config", None)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
            "torch_version": torch.__version__, "method": None if cfg is None else cfg.to_dict(),
            "kv_cache": None if kv is None else kv.to_dict(), "qlinear": layers}
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        save_model(model, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt", "llmeasyquant": "1"})
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, QUANT_FILE), "w") as fh:
            json.dump(meta, fh, indent=1)
        if os.path.exists(path):
            old = f"{tmp}-old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_quantized_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, QUANT_FILE))


def _read_meta(path: str) -> dict:
    qpath = os.path.join(path, QUANT_FILE)
    if not os.path.isfile(qpath):
        raise FileNotFoundError(f"load: {path} is not a saved llmeasyquant model (no {QUANT_FILE}); "
                                "write one with llmeasyquant.save(model, path)")
    try:
        with open(qpath) as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"load: {qpath} is not valid JSON ({err})") from err
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise ValueError(f"load: {qpath} is not an llmeasyquant quantization file")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"load: {path} was written in format version {meta['format_version']} by llmeasyquant "
                         f"{meta.get('library_version')}; this llmeasyquant ({_library_version()}) reads "
                         f"versions <= {FORMAT_VERSION}: upgrade llmeasyquant")
    if meta["format_version"] < 2 and any(spec.get("w_bits") in (2, 3) for spec in meta.get("qlinear", {}).values()):
        raise ValueError(f"load: {path} holds 2/3-bit layers in format version 1 (4-bit container); this "
                         "llmeasyquant packs them as bit streams (version 2): re-quantize the model")
    return meta


def load(path: str, *, device: Optional[str] = None, with_tokenizer: bool = False):
    """Restore a model written by :func:`save`: same modules, same tensors, so
    the same logits bit for bit; no calibration data needed. Returns the model
    (and the tokenizer, with ``with_tokenizer=True``)."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    meta = _read_meta(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for name, spec in meta["qlinear"].items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"load: {QUANT_FILE} names layer {name!r}, which a {config.model_type} model with "
                             f"this config.json does not have") from err
        model.set_submodule(name, QLinear.from_spec(spec))
    wpath = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"load: {wpath} is missing")
    try:
        missing, unexpected = load_model(model, wpath, strict=False)
    except SafetensorError as err:
        raise ValueError(f"load: {wpath} is truncated or corrupt ({err})") from err
    except (RuntimeError, ValueError) as err:  # shape mismatches (load_state_dict, QLinear checks)
        raise ValueError(f"load: {wpath} does not match the model described by {QUANT_FILE} and config.json: "
                         f"{err}") from err
    if missing or unexpected:
        raise ValueError(f"load: {wpath} does not match the model: missing tensors {sorted(missing)[:8]}, "
                         f"unexpected tensors {sorted(unexpected)[:8]}")
    model.eval()
    if meta.get("method"):
        from .methods.base import config_from_json

        model.llmeq_config = config_from_json(json.dumps(meta["method"]))
    if meta.get("kv_cache"):
        from .methods import simquant
        from .methods.base import config_from_json

        simquant.apply(model, None, config_from_json(json.dumps(meta["kv_cache"])), [], progress=False)
    if device is not None:
        model.to(device)
    if with_tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model, tok
    return model


# transformers-style spelling
from_pretrained = load
