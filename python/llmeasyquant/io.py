"""Save and load quantized models: a self-contained folder with

* ``model.safetensors`` — every tensor of the model (packed integer weights,
  scales, zero-points, activation state, the float rest), no pickle;
* ``quantization.json`` — format version, library version, the method config,
  and one entry per QLinear (its constructor arguments), plus the KV-cache
  config for SimQuant;
* ``config.json`` (+ generation config) — the base model's transformers config;
* the tokenizer files, when a tokenizer is given.

Writes go to a staging folder beside the destination that is renamed into
place (:mod:`llmeasyquant.outdir`): an interrupted save never leaves a
half-written model folder, and never replaces a folder that is not ours.
Loads treat the folder as untrusted (:mod:`llmeasyquant.checkpoint_checks`).

``save(..., format="compressed-tensors" | "gptq" | "awq")`` writes the folder
serving engines read instead, and ``load`` reads such folders (ours or a
peer's): :mod:`llmeasyquant.formats` holds each format's writer and reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint_checks import (FolderError, check_folder_files, check_layer_count, check_meta,
                                compare_with_header, read_safetensors_header)
from . import formats
from .models.experts import match_checkpoint
from .models.rotate import rotated
from .nn import input_rotation
from .nn.qlinear import QLinear
from .outdir import check_destination, recover, replace_atomically

FORMAT = "llmeasyquant"
# 2: 2- and 3-bit weights packed as bit streams (version 1 kept them in the 4-bit container)
# 3: "input_rotation" (layers rotating their input online). The newest version
# load reads; save writes it only for a folder that needs it, else version 2,
# which older releases still read
FORMAT_VERSION = 3
_VERSION_WITHOUT_ROTATION = 2
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_JSON_BYTES = 64 * 2**20  # quantization.json: a few hundred bytes per layer


def _library_version() -> str:
    from ._native import build_info

    return build_info()["version"]


def _is_our_model(folder: Path) -> bool:
    """An existing folder we may replace without ``overwrite``: a model we
    wrote (native, or exported: the export marker)."""
    for name, key, value in ((QUANT_FILE, "format", FORMAT),
                             (formats.EXPORT_MARKER, "format", formats.EXPORT_MARKER_FORMAT)):
        try:
            with open(folder / name) as fh:
                if json.load(fh).get(key) == value:
                    return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def check_save_destination(path, overwrite: bool = False) -> Path:
    """Raise (before any work) if ``save(model, path)`` would harm something:
    see :func:`llmeasyquant.outdir.check_destination`."""
    return check_destination(path, overwrite=overwrite, is_ours=_is_our_model, what="save")


def save(model: nn.Module, path, tokenizer=None, *, overwrite: bool = False, format: str = formats.NATIVE) -> str:
    """Write ``model`` (quantized by :func:`llmeasyquant.quantize`, or any HF
    causal LM holding QLinear layers) to the folder ``path``. Returns the
    absolute path.

    ``format``: ``"native"`` (default: everything llmeasyquant holds, read by
    :func:`load`), ``"compressed-tensors"`` (vLLM, SGLang, transformers),
    ``"gptq"`` (vLLM, TGI, GPTQ kernels) or ``"awq"`` (AWQ GEMM, 4-bit
    groups). What a format cannot say raises ``ValueError`` before anything
    is written (see :mod:`llmeasyquant.formats`); the same destination checks
    and atomic swap apply to every format.

    An existing ``path`` is replaced only when it is empty or an llmeasyquant
    model folder; any other folder needs ``overwrite=True``. A file, a link,
    the current directory and its parents are never replaced. The folder is
    written beside ``path`` and swapped in by renames; a save killed midway is
    rolled back by the next save or load of ``path``."""
    from safetensors.torch import save_model

    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise TypeError(f"save: expected a transformers model (with .config), got {type(model).__name__}")
    if format != formats.NATIVE:
        return _save_foreign(model, path, tokenizer, overwrite, format)
    dest = check_save_destination(path, overwrite)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            m.check_values(f"save: layer {name!r}")
            layers[name] = m.spec()
    kv = getattr(model, "llmeq_kv_config", None)
    cfg = getattr(model, "llmeq_config", None)
    online = input_rotation.rotated_inputs(model)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION if online else _VERSION_WITHOUT_ROTATION,
            "library_version": _library_version(),
            "torch_version": torch.__version__, "method": None if cfg is None else cfg.to_dict(),
            "kv_cache": None if kv is None else kv.to_dict(), "qlinear": layers}
    if online:
        meta["input_rotation"] = online
    if rotated(model) is not None:
        meta["rotation"] = rotated(model)
    with replace_atomically(dest) as tmp:
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "llmeasyquant": "1"})
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / QUANT_FILE, "w") as fh:  # last: its presence marks a complete folder
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    return str(dest)


def _save_foreign(model: nn.Module, path, tokenizer, overwrite: bool, fmt: str) -> str:
    write = formats.get(fmt).prepare(model)  # every check before the folder is touched
    dest = check_save_destination(path, overwrite)
    cfg = getattr(model, "llmeq_config", None)
    marker = {"format": formats.EXPORT_MARKER_FORMAT, "target_format": fmt, "library_version": _library_version(),
              "torch_version": torch.__version__, "method": None if cfg is None else cfg.to_dict()}
    with replace_atomically(dest) as tmp:
        write(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / formats.EXPORT_MARKER, "w") as fh:
            json.dump(marker, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    return str(dest)


def is_quantized_folder(path) -> bool:
    """A folder :func:`load` reads: native, or a compressed-tensors / GPTQ / AWQ one
    (a look at the config files only; :func:`load` checks the folder in full)."""
    if os.path.isfile(os.path.join(path, QUANT_FILE)):
        return True
    for name, method in (("config.json", None), ("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        try:
            with open(os.path.join(path, name), "rb") as fh:
                d = json.loads(fh.read(_MAX_JSON_BYTES))
        except (OSError, ValueError, RecursionError):
            continue
        qc = d.get("quantization_config") if method is None and isinstance(d, dict) else d
        if isinstance(qc, dict) and formats.for_quant_method(qc.get("quant_method", method)) is not None:
            return True
    return False


def _foreign_format(path: Path):
    """(format module, quantization_config) of a foreign folder, or None;
    config.json is read with the untrusted-folder checks."""
    from .formats._folder import read_quantization_config

    if not os.path.lexists(path / "config.json"):
        return None
    qc = read_quantization_config(path)
    mod = formats.for_quant_method(qc.get("quant_method")) if qc else None
    return None if mod is None else (mod, qc)


def load_any(path, *, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a folder written by :func:`save` or from
    anything :func:`llmeasyquant.models.load_model` takes (HF folder, .gguf,
    the default model's name)."""
    from .models import load_model

    if os.path.isdir(path) and is_quantized_folder(path):
        return load(path, with_tokenizer=True, trust_remote_code=trust_remote_code)
    return load_model(path, trust_remote_code=trust_remote_code)


def _read_meta(path: Path) -> dict:
    qpath = path / QUANT_FILE
    if not os.path.lexists(qpath):
        raise FileNotFoundError(f"load: {path} is not a saved llmeasyquant model (no {QUANT_FILE}, and no "
                                "compressed-tensors / GPTQ / AWQ quantization_config in config.json); write one with "
                                "llmeasyquant.save(model, path)")
    check_folder_files(path, [QUANT_FILE, WEIGHTS_FILE, "config.json"])
    with open(qpath, "rb") as fh:
        raw = fh.read(_MAX_JSON_BYTES + 1)
    if len(raw) > _MAX_JSON_BYTES:
        raise FolderError(f"load: {qpath} is larger than {_MAX_JSON_BYTES} bytes")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise FolderError(f"load: {qpath} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FolderError(f"load: {qpath} is not an llmeasyquant quantization file")
    check_meta(meta, qpath)
    if meta["format_version"] > FORMAT_VERSION:
        raise FolderError(f"load: {path} was written in format version {meta['format_version']} by llmeasyquant "
                          f"{meta.get('library_version')}; this llmeasyquant ({_library_version()}) reads "
                          f"versions <= {FORMAT_VERSION}: upgrade llmeasyquant")
    if meta["format_version"] < 2 and any(spec.get("w_bits") in (2, 3) for spec in meta["qlinear"].values()):
        raise FolderError(f"load: {path} holds 2/3-bit layers in format version 1 (4-bit container); this "
                          "llmeasyquant packs them as bit streams (version 2): re-quantize the model")
    return meta


def _build(path: Path, meta: dict, trust_remote_code: bool):
    """The model described by config.json + quantization.json, checked against
    the weights file's header on the meta device before it is allocated."""
    import transformers

    wpath = path / WEIGHTS_FILE
    if not os.path.lexists(wpath):
        raise FileNotFoundError(f"load: {wpath} is missing")
    header = read_safetensors_header(wpath)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    check_layer_count(config, header, path)

    # The float part of the model is built in the dtype the file holds it in
    # (a model cast to bfloat16 before saving loads as bfloat16).
    prefixes = tuple(f"{name}." for name in meta["qlinear"])
    float_dtypes = {dt for k, (dt, _) in header.items() if dt.is_floating_point and not k.startswith(prefixes)}
    dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32

    def build():
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                              dtype=dtype)
        # a MoE model quantized by llmeasyquant holds one linear per expert
        # projection (models/experts.py): rebuild that structure first
        match_checkpoint(model, header)
        for name, spec in meta["qlinear"].items():
            try:
                model.get_submodule(name)
            except AttributeError as err:
                raise FolderError(f"load: {QUANT_FILE} names layer {name!r}, which a {config.model_type} model "
                                  f"with this config.json does not have") from err
            try:
                layer = QLinear.from_spec(spec)
            except ValueError as err:
                raise FolderError(f"load: {QUANT_FILE}, layer {name!r}: {err}") from err
            model.set_submodule(name, layer)
        return model

    with torch.device("meta"):
        shell = build()
    compare_with_header({k: (v.dtype, tuple(v.shape)) for k, v in shell.state_dict().items()}, header, wpath)
    del shell
    return build(), wpath


def _restore_rotation(model: nn.Module, meta: dict, qpath: Path) -> None:
    """Re-attach the online input rotations ``quantization.json`` lists (types
    checked by check_meta; the layers and orders are checked here)."""
    for name, n in meta.get("input_rotation", {}).items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise FolderError(f"load: {qpath} rotates the input of layer {name!r}, which this model does not "
                              "have") from err
        try:
            input_rotation.attach(layer, n)
        except (ValueError, TypeError, AttributeError) as err:
            raise FolderError(f"load: {qpath}, input_rotation of {name!r}: {err}") from err
    if meta.get("rotation") is not None:
        model.llmeq_rotation = meta["rotation"]


def load(path, *, device: Optional[str] = None, with_tokenizer: bool = False, trust_remote_code: bool = False):
    """Restore a model written by :func:`save`: same modules, same tensors, so
    the same logits bit for bit; no calibration data needed. Returns the model
    (and the tokenizer, with ``with_tokenizer=True``).

    The folder is untrusted input: every file is checked before use (see
    :mod:`llmeasyquant.checkpoint_checks`) and a malformed one raises
    ``ValueError`` saying what is wrong. Python code shipped in the folder
    (``auto_map``) never runs unless ``trust_remote_code=True``."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    recover(path)
    try:
        if not os.path.lexists(path / QUANT_FILE) and os.path.isdir(path):
            foreign = _foreign_format(path)
            if foreign is not None:
                return _load_foreign(path, foreign, device, with_tokenizer, trust_remote_code)
        return _load(path, device, with_tokenizer, trust_remote_code)
    except (KeyError, AttributeError, TypeError, IndexError, RecursionError, UnicodeDecodeError) as err:
        raise FolderError(f"load: {path} is not a valid llmeasyquant folder: {type(err).__name__}: {err}") from err


def _finish(model, path: Path, device, with_tokenizer: bool, trust_remote_code: bool):
    import transformers

    if device is not None:
        model.to(device)
    if with_tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                         trust_remote_code=trust_remote_code)
        return model, tok
    return model


def _load_foreign(path: Path, foreign, device, with_tokenizer: bool, trust_remote_code: bool):
    mod, qc = foreign
    model = mod.read(path, qc, trust_remote_code)
    return _finish(model, path, device, with_tokenizer, trust_remote_code)


def _load(path: Path, device, with_tokenizer: bool, trust_remote_code: bool):
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .methods.base import config_from_json

    meta = _read_meta(path)
    try:  # the configs are parsed before anything is built
        method = config_from_json(json.dumps(meta["method"])) if meta.get("method") else None
        kv = config_from_json(json.dumps(meta["kv_cache"])) if meta.get("kv_cache") else None
    except ValueError as err:
        raise FolderError(f"load: {path / QUANT_FILE} holds an invalid method config: {err}") from err
    model, wpath = _build(path, meta, trust_remote_code)
    try:
        missing, unexpected = load_model(model, str(wpath), strict=False)
    except SafetensorError as err:
        raise FolderError(f"load: {wpath} is truncated or corrupt ({err})") from err
    except (RuntimeError, ValueError) as err:  # shape mismatches, QLinear.check_values
        raise FolderError(f"load: {wpath} does not match the model described by {QUANT_FILE} and config.json, "
                          f"or holds invalid values: {err}") from err
    if missing or unexpected:
        raise FolderError(f"load: {wpath} does not match the model: missing tensors {sorted(missing)[:8]}, "
                          f"unexpected tensors {sorted(unexpected)[:8]}")
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FolderError(f"load: {wpath}: tensor {name!r} holds NaN or Inf values")
    _restore_rotation(model, meta, path / QUANT_FILE)
    model.eval()
    if method is not None:
        model.llmeq_config = method
    if kv is not None:
        from .methods import simquant

        try:
            simquant.apply(model, None, kv, [], progress=False)
        except ValueError as err:
            raise FolderError(f"load: {path / QUANT_FILE} holds an invalid KV-cache config: {err}") from err
    return _finish(model, path, device, with_tokenizer, trust_remote_code)


# transformers-style spelling
from_pretrained = load
