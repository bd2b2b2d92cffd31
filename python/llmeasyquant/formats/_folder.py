"""What the foreign-format writers and readers share: the layers to convert,
the float rest of the model, safetensors files (one or sharded) read with the
same bounds as a native folder, and the model built on the meta device and
checked against the file headers before anything is allocated.

A foreign folder (``config.json`` + ``*.safetensors``, written by us or by a
peer) is untrusted exactly as a native one: links leaving it are refused,
JSON is size-capped and type-checked, every header is parsed with bounds
(:func:`llmeasyquant.checkpoint_checks.read_safetensors_header`), and the
model is compared with the headers on the meta device first. No code from
the folder runs unless the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..checkpoint_checks import (FolderError, check_folder_files, check_layer_count, compare_with_header,
                                 read_safetensors_header)
from ..models.experts import moe_facts
from ..nn import input_rotation
from ..nn.qlinear import QLinear

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_JSON_BYTES = 64 * 2**20
# a shard named by the index must be a plain file name in the folder
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+\.safetensors$")


# --------------------------------------------------------------------- write
def quantized_layers(model: nn.Module, fmt: str) -> dict[str, QLinear]:
    """name -> QLinear of ``model``, each checked to replace an ``nn.Linear``
    (the readers of every foreign format hold ``weight [out, in]`` of a
    Linear; GPT-2's Conv1D is stored transposed, which they do not expect)."""
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise TypeError(f"save: expected a transformers model (with .config), got {type(model).__name__}")
    if moe_facts(model) is not None:
        raise ValueError(f"save(format={fmt!r}): {model.config.model_type} is a mixture-of-experts model; "
                         "llmeasyquant quantizes its experts as one linear per expert projection "
                         "(experts.0.gate_proj, ...), while transformers 5 (and so this format's readers) hold "
                         "them fused as 3-D parameters (experts.gate_up_proj); the per-expert layers have no "
                         "place in the format: save it in the native format")
    online = input_rotation.rotated_inputs(model)
    if online:
        raise ValueError(f"save(format={fmt!r}): {len(online)} layer(s) rotate their input online (a rotated "
                         f"model: {next(iter(online))}, ...); {fmt} has no way to say so, and its readers would run "
                         "those layers on unrotated inputs. Rotate with rotate_online=False (only offline, folded "
                         "rotations: exportable) or save in the native format")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if not layers:
        raise ValueError(f"save(format={fmt!r}): the model holds no QLinear layer; quantize it first")
    with torch.device("meta"):
        shell = type(model)(model.config)
    for name, layer in layers.items():
        layer.check_values(f"save: layer {name!r}")
        try:
            orig = shell.get_submodule(name)
        except AttributeError:
            orig = None
        if not isinstance(orig, nn.Linear):
            raise ValueError(f"save(format={fmt!r}): layer {name!r} replaces a {type(orig).__name__}, not an "
                             f"nn.Linear; {fmt} readers expect a Linear weight [out, in] (GPT-2's Conv1D layers "
                             "can only be saved in the native format)")
    return layers


def float_tensors(model: nn.Module, layers: dict[str, QLinear]) -> dict[str, torch.Tensor]:
    """Every tensor of the model outside the QLinear layers (embeddings, norms,
    an unquantized lm_head), tied tensors written once (the first name, as
    transformers' save_pretrained keeps the tie source ``embed_tokens``)."""
    prefixes = tuple(f"{n}." for n in layers)
    out, seen = {}, {}
    for k, t in model.state_dict().items():
        if k.startswith(prefixes):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = t.detach().cpu().contiguous()
    return out


def float_linears(model: nn.Module, layers: dict[str, QLinear]) -> list[str]:
    """The linears a format must list as left unquantized: every nn.Linear of
    the architecture (built on meta: the live model holds QLinears there) not
    in ``layers``."""
    with torch.device("meta"):
        shell = type(model)(model.config)
    return [n for n, m in shell.named_modules() if isinstance(m, nn.Linear) and n not in layers]


def folder_writer(model: nn.Module, layers: dict[str, QLinear], layer_tensors: Callable[[str, QLinear], dict],
                  quantization_config: dict) -> Callable[[Path], None]:
    """``write(tmp)``: the float tensors, each layer's tensors in the format
    (``layer_tensors(name, layer)``) and config.json, into the staging folder."""
    def write(tmp: Path) -> None:
        tensors = float_tensors(model, layers)
        for name, layer in layers.items():
            tensors.update(layer_tensors(name, layer))
        write_folder(tmp, model, tensors, quantization_config)

    return write


def write_folder(tmp: Path, model: nn.Module, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    """config.json with ``quantization_config`` (what transformers and the
    serving engines dispatch on) + one model.safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    with open(tmp / CONFIG_FILE) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"] = quantization_config
    with open(tmp / CONFIG_FILE, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)


# ---------------------------------------------------------------------- read
def read_json(path: Path, what: str):
    if not os.path.lexists(path):
        raise FileNotFoundError(f"load: {path} is missing")
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_JSON_BYTES + 1)
    if len(raw) > _MAX_JSON_BYTES:
        raise FolderError(f"load: {path} is larger than {_MAX_JSON_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise FolderError(f"load: {path} ({what}) is not valid JSON ({err})") from err


# older folders keep the config beside config.json: AutoGPTQ's
# quantize_config.json, AutoAWQ's quant_config.json (file -> quant_method)
LEGACY_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def read_quantization_config(path: Path) -> Optional[dict]:
    """``config.json``'s ``quantization_config``, else a legacy config file's
    content (with its ``quant_method``), else None."""
    check_folder_files(path, [CONFIG_FILE, *LEGACY_CONFIGS])
    cfg = read_json(path / CONFIG_FILE, "the model config")
    if not isinstance(cfg, dict):
        raise FolderError(f"load: {path / CONFIG_FILE} is not a JSON object")
    qc = cfg.get("quantization_config")
    if qc is None:
        for name, method in LEGACY_CONFIGS.items():
            if os.path.lexists(path / name):
                qc = read_json(path / name, "the quantization config")
                if isinstance(qc, dict):
                    qc = {"quant_method": method, **qc}
                break
    if qc is not None and not isinstance(qc, dict):
        raise FolderError(f"load: {path}: the quantization config must be an object, got {type(qc).__name__}")
    return qc


def read_headers(path: Path) -> tuple[dict, dict]:
    """(name -> (dtype, shape), name -> file) over model.safetensors or the
    shards its index names; every header bounded by its file's real size."""
    if os.path.lexists(path / INDEX_FILE):
        check_folder_files(path, [INDEX_FILE])
        index = read_json(path / INDEX_FILE, "the shard index")
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise FolderError(f"load: {path / INDEX_FILE}: expected a 'weight_map' object of tensor -> file names")
        files = sorted(set(wmap.values()))
        bad = [f for f in files if not _SHARD_NAME.match(f)]
        if bad:
            raise FolderError(f"load: {path / INDEX_FILE} names shard files that are not plain .safetensors names "
                              f"in the folder: {bad[:4]}")
    else:
        files = [WEIGHTS_FILE]
    check_folder_files(path, files)
    header, where = {}, {}
    for f in files:
        fpath = path / f
        if not os.path.lexists(fpath):
            raise FileNotFoundError(f"load: {fpath} is missing")
        for k, v in read_safetensors_header(fpath).items():
            if k in header:
                raise FolderError(f"load: tensor {k!r} is in two shards ({where[k]} and {f})")
            header[k], where[k] = v, f
    return header, where


def load_config(path: Path, trust_remote_code: bool):
    """The transformers config, without its ``quantization_config``: the
    model is built plain and its layers swapped for QLinear here (a re-save in
    the native format must not claim a foreign quantization)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def linear_names(config, trust_remote_code: bool) -> tuple[dict[str, nn.Module], Callable]:
    """name -> module of the plain model on meta, and ``build(dtype)``, a
    builder of that model (the float dtype is known only once the header is)."""
    import transformers

    def build(dtype=torch.float32):
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)

    with torch.device("meta"):
        shell = build()
    return dict(shell.named_modules()), build


def packed_linears(path: Path, header: dict, modules: dict[str, nn.Module], config, fmt: str) -> dict[str, nn.Linear]:
    """The layers a GPTQ / AWQ file quantizes (those with a ``.qweight``),
    each checked to be a Linear of the model config.json describes; ``fmt``
    names the config in messages ("a GPTQ", "an AWQ")."""
    names = [k[: -len(".qweight")] for k in header if k.endswith(".qweight")]
    if not names:
        raise FolderError(f"load: {path}: {fmt} config but no '.qweight' tensor in the weights")
    out = {}
    for name in names:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise FolderError(f"load: {path}: {name}.qweight belongs to no Linear layer of this "
                              f"{config.model_type} model")
        out[name] = m
    return out


def load_converted(path: Path, config, header: dict, specs: dict, want: dict, tensors: dict[str, torch.Tensor],
                   converted: dict[str, dict], build: Callable) -> nn.Module:
    """The model with QLinears of ``specs`` (checked on meta against the
    header), loaded with the file's float tensors and each layer's tensors
    converted to QLinear's (``converted[name]``)."""
    prefixes = tuple(f"{n}." for n in specs)
    dtype = float_dtype(header, prefixes)
    model = build_checked(path, config, header, specs, want, lambda: build(dtype))
    state = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    for out in converted.values():
        state.update(out)
    return finish(model, state, path)


def float_dtype(header: dict, quantized_prefixes: tuple) -> torch.dtype:
    dts = {dt for k, (dt, _) in header.items() if dt.is_floating_point and not k.startswith(quantized_prefixes)}
    return dts.pop() if len(dts) == 1 else torch.float32


def check_layer_tensors(path: Path, header: dict, file_tensors: dict[str, dict]) -> None:
    """Each quantized layer's tensors are in the header with the dtype and
    shape its format prescribes (checked before any is read)."""
    for name, want in file_tensors.items():
        for key, (dt, shape) in want.items():
            got = header.get(key)
            if got is None:
                raise FolderError(f"load: {path}: layer {name!r} lacks tensor {key!r}")
            if got != (dt, shape):
                raise FolderError(f"load: {path}: {key} is {str(got[0]).replace('torch.', '')} {list(got[1])}, "
                                  f"expected {str(dt).replace('torch.', '')} {list(shape)}")


def build_checked(path: Path, config, header: dict, specs: dict[str, dict], file_tensors: dict[str, dict],
                  build: Callable):
    """The model with a QLinear of ``specs[name]`` at each quantized layer,
    checked on meta against the header: the float rest must match it exactly,
    and each quantized layer's tensors (``file_tensors[name]``: file key ->
    (dtype, shape), as its format prescribes) must all be there."""
    check_layer_count(config, header, path)

    def with_qlinears():
        model = build()
        for name, spec in specs.items():
            try:
                layer = QLinear.from_spec(spec)
            except ValueError as err:
                raise FolderError(f"load: layer {name!r}: {err}") from err
            model.set_submodule(name, layer)
        return model

    with torch.device("meta"):
        shell = with_qlinears()
    prefixes = tuple(f"{n}." for n in specs)
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in shell.state_dict().items() if not k.startswith(prefixes)}
    check_layer_tensors(path, header, file_tensors)
    for want in file_tensors.values():
        expected.update(want)
    compare_with_header(expected, header, path)
    del shell
    return with_qlinears()


def read_tensors(path: Path, where: dict, names) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out, by_file = {}, {}
    for k in names:
        by_file.setdefault(where[k], []).append(k)
    for f, keys in by_file.items():
        try:
            with safe_open(str(path / f), framework="pt") as fh:
                for k in keys:
                    out[k] = fh.get_tensor(k)
        except SafetensorError as err:
            raise FolderError(f"load: {path / f} is truncated or corrupt ({err})") from err
    return out


def finish(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Load ``state`` (the model's own names) strictly: every tensor of the
    model comes from the file except tied ones, every value is finite and
    every QLinear passes ``check_values`` (its load hook)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as err:
        raise FolderError(f"load: {path} does not match the model described by config.json, or holds invalid "
                          f"values: {err}") from err
    # a tensor may be absent only when the model ties it to one that was loaded
    names_of = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    untied = [k for k in missing
              if not any(o in state for o in names_of.get(id(_lookup(model, k)), []) if o != k)]
    if untied or unexpected:
        raise FolderError(f"load: {path} does not match the model: missing tensors {sorted(untied)[:8]}, "
                          f"unexpected tensors {sorted(unexpected)[:8]}")
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FolderError(f"load: {path}: tensor {name!r} holds NaN or Inf values")
    return model.eval()


def _lookup(model: nn.Module, key: str):
    mod, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(mod) if mod else model, attr, None)


def scale_storage(dtype: torch.dtype, key: str) -> str:
    """QLinear's ``w_scale_dtype`` for a scale tensor stored in ``dtype``
    (bfloat16 widens to float32 exactly: QLinear holds fp32 or fp16 scales)."""
    if dtype == torch.float16:
        return "float16"
    if dtype in (torch.float32, torch.bfloat16):
        return "float32"
    raise FolderError(f"load: {key}: expected float32, float16 or bfloat16 scales, got {dtype}")
