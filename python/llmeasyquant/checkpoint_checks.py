"""Checks of a saved folder read from disk, before anything is built from it.

A folder is untrusted input: its JSON may be malformed or hostile, its
safetensors header may claim shapes the file does not hold, its files may be
links to elsewhere. ``io.load`` calls these in order:

1. :func:`check_folder_files` — every file it reads is a regular file inside
   the folder (no symbolic link leaving it).
2. :func:`check_meta` — ``quantization.json`` has the fields and types this
   version writes (a clear ``ValueError`` instead of a ``KeyError`` later).
3. :func:`read_safetensors_header` — the header of ``model.safetensors``
   parsed with bounds (header length within the file, every tensor's byte
   range inside the data section, no overlaps, sizes that match
   shape x dtype), so the file's real size caps what the declared tensors
   can make anyone allocate.
4. :func:`compare_with_header` — the model built on the meta device (no
   memory) from ``config.json`` + ``quantization.json`` must declare exactly
   the tensors, shapes and dtypes of the header; only then is it built for real.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

# safetensors dtype names -> (torch dtype, bytes per element)
_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
# A header is JSON text naming each tensor: 100 MB is far beyond any model we write.
_MAX_HEADER_BYTES = 100 * 2**20

SPEC_TYPES = {  # QLinear.spec(): key -> allowed Python types
    "in_features": (int,), "out_features": (int,), "bias": (bool,), "w_bits": (int,), "w_group_size": (int,),
    "w_symmetric": (bool,), "act": (str, type(None)), "act_symmetric": (bool,), "ema_alpha": (int, float),
    "ema_eps": (int, float), "w_scale_dtype": (str,), "bias_dtype": (str,),
    "in_perm": (bool,),
}
_REQUIRED_SPEC = {"in_features", "out_features"}


class FolderError(ValueError):
    """A saved folder that is not a valid llmeasyquant model."""


def check_folder_files(folder: Path, required=()) -> None:
    """No entry of ``folder`` is a symbolic link whose target leaves it, and
    each ``required`` name that exists is a regular file."""
    root = folder.resolve()
    for entry in os.scandir(folder):
        p = Path(entry.path)
        if entry.is_symlink():
            real = p.resolve()
            if root not in real.parents:
                raise FolderError(f"load: {p} is a link to {real}, outside the folder {root}; refusing to read it")
    for name in required:
        p = folder / name
        if os.path.lexists(p) and not p.resolve().is_file():
            raise FolderError(f"load: {p} is not a regular file")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_meta(meta, qpath) -> None:
    """Types and ranges of every field of quantization.json that load uses."""
    def bad(msg):
        raise FolderError(f"load: {qpath} is not a valid llmeasyquant quantization file: {msg}")

    if not isinstance(meta, dict):
        bad(f"expected a JSON object, got {type(meta).__name__}")
    v = meta.get("format_version")
    if not _is_int(v) or v < 1:
        bad(f"format_version must be an integer >= 1, got {v!r}")
    for key in ("method", "kv_cache"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            bad(f"'{key}' must be an object or null, got {type(meta[key]).__name__}")
    if meta.get("rotation") is not None and not isinstance(meta["rotation"], dict):
        bad(f"'rotation' must be an object or null, got {type(meta['rotation']).__name__}")
    online = meta.get("input_rotation", {})
    if not isinstance(online, dict):
        bad(f"'input_rotation' must be an object (layer name -> order), got {type(online).__name__}")
    for name, n in online.items():
        if not _is_int(n) or not 1 <= n <= 1 << 20:
            bad(f"input_rotation of {name!r}: expected an integer order in [1, 2**20], got {n!r}")
    layers = meta.get("qlinear")
    if not isinstance(layers, dict):
        bad(f"'qlinear' must be an object (layer name -> spec), got {type(layers).__name__}")
    for name, spec in layers.items():
        if not isinstance(spec, dict):
            bad(f"layer {name!r}: spec must be an object, got {type(spec).__name__}")
        missing = _REQUIRED_SPEC - spec.keys()
        if missing:
            bad(f"layer {name!r}: spec lacks {sorted(missing)}")
        for key, val in spec.items():
            types = SPEC_TYPES.get(key)
            if types is None:
                bad(f"layer {name!r}: unknown spec field {key!r}")
            if not isinstance(val, types) or (int in types and float not in types and isinstance(val, bool)):
                bad(f"layer {name!r}: {key} must be {' or '.join(t.__name__ for t in types)}, got {val!r}")
        for key in ("in_features", "out_features"):
            if spec[key] < 1:
                bad(f"layer {name!r}: {key} must be >= 1, got {spec[key]}")
        for key in ("ema_alpha", "ema_eps"):
            if key in spec and not math.isfinite(spec[key]):
                bad(f"layer {name!r}: {key} must be finite, got {spec[key]}")


def read_safetensors_header(path: Path) -> dict:
    """name -> (torch dtype, shape) from a safetensors file, every entry
    checked against the file's real size (nothing is allocated but the header)."""
    size = path.stat().st_size

    def bad(msg):
        raise FolderError(f"load: {path} is truncated or corrupt ({msg})")

    if size < 8:
        bad(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(size - 8, _MAX_HEADER_BYTES):
            bad(f"header length {n} bytes, the file holds {size - 8} after the length field")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        bad(f"header is not JSON: {err}")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    data_size = size - 8 - n
    out, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            bad(f"entry {name!r} is not an object")
        dt, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dt not in _ST_DTYPES:
            bad(f"tensor {name!r}: dtype {dt!r} is not one of {sorted(_ST_DTYPES)}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_size):
            bad(f"tensor {name!r}: byte range {offs!r} lies outside the {data_size}-byte data section")
        torch_dt, width = _ST_DTYPES[dt]
        nbytes = math.prod(shape) * width
        if offs[1] - offs[0] != nbytes:
            bad(f"tensor {name!r}: {dt} {shape} needs {nbytes} bytes, its byte range holds {offs[1] - offs[0]}")
        out[name] = (torch_dt, tuple(shape))
        ranges.append((offs[0], offs[1], name))
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0 and b1 < e1:
            bad(f"tensors {n0!r} and {n1!r} overlap in the file")
    return out


def check_layer_count(config, header: dict, path) -> None:
    """A config.json claiming more layers than the weights file holds tensors
    would build a huge model (even on the meta device, millions of modules)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, key, None)
        if _is_int(v) and v > len(header):
            raise FolderError(f"load: {path}/config.json declares {key}={v}, but the weights file holds only "
                              f"{len(header)} tensors")


def compare_with_header(expected: dict, header: dict, wpath) -> None:
    """``expected``: name -> (dtype, shape) of the model's state_dict (built on
    meta). Both sides must agree exactly, tied weights aside (a file may omit
    a tensor the model ties to another)."""
    problems = []
    for name, (dt, shape) in expected.items():
        got = header.get(name)
        if got is None:
            continue  # checked after loading (tied weights are saved once)
        if got != (dt, shape):
            problems.append(f"{name}: file has {str(got[0]).replace('torch.', '')} {list(got[1])}, "
                            f"the model needs {str(dt).replace('torch.', '')} {list(shape)}")
    extra = sorted(set(header) - set(expected))
    if extra:
        problems.append(f"unexpected tensors {extra[:8]}")
    if problems:
        raise FolderError(f"load: {wpath} does not match the model described by quantization.json and "
                          f"config.json: " + "; ".join(problems[:8]))
