"""AWQ GEMM folders (``quantization_config.quant_method = "awq"``, ``version
"gemm"``), the layout of AutoAWQ that vLLM (awq, awq_marlin), SGLang and TGI
read. 4-bit only (AutoAWQ's GEMM kernels are 4-bit).

The mapping, per quantized ``nn.Linear`` with ``N`` outputs, ``K`` inputs,
``G = K / group_size`` groups (read from AutoAWQ's ``pack`` and checked
against compressed-tensors' ``AutoAWQConverter``, which undoes it):

* unsigned codes, no offset: ``w[k, n] = scales[g, n] * (q_u[k, n] -
  z_u[g, n])``; ours ``s * (q - zp)`` with ``q_u = q + 8``, ``z_u = zp + 8``
  (unlike GPTQ v1 there is no ``- 1`` on the zeros: every zero-point fits).
* ``qweight`` int32 ``[K, N/8]``: packed along **N** (GPTQ packs along K),
  8 columns per word in AutoAWQ's interleaved order: nibble ``j`` (bits
  ``4j..4j+3``) of word ``c`` holds column ``8c + [0, 2, 4, 6, 1, 3, 5, 7][j]``.
* ``qzeros`` int32 ``[G, N/8]``: the same packing. AWQ kernels always read
  them, so a symmetric layer is written with ``z_u = 8`` (exact), and the
  config says ``zero_point: true``.
* ``scales`` ``[G, N]`` in the layer's scale dtype; ``bias`` as held.

Save raises ``ValueError`` for what AWQ GEMM cannot say: other than 4 bits,
per-channel weights (AWQ groups are > 0), quantized activations, ``N`` not a
multiple of 8, layers of different group sizes, GPT-2 Conv1D layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import quant_format
from ..checkpoint_checks import FolderError
from . import _folder

NAME = "awq"
QUANT_METHOD = "awq"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds column 8c + ORDER[j]
_MID = 8


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[R, N]`` -> int32 ``[R, N/8]`` in AWQ's order."""
    R, N = codes.shape
    c = codes.to(torch.int64).reshape(R, N // 8, 8)[:, :, list(ORDER)]
    w = (c << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).contiguous()


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 ``[R, N/8]`` -> int64 codes ``[R, N]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = (w.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * 4)) & 0xF  # [R, C, j]
    out = torch.empty_like(nib)
    out[:, :, list(ORDER)] = nib
    return out.reshape(w.shape[0], -1)


# --------------------------------------------------------------------- write
def _check(layers: dict) -> int:
    sizes = {}
    for name, layer in layers.items():
        if layer.act is not None:
            raise ValueError(f"save(format='awq'): layer {name!r} has act={layer.act!r}; AWQ checkpoints are "
                             "weight-only (save W8A8 models with format='compressed-tensors')")
        if layer.in_perm is not None:
            raise ValueError(f"save(format='awq'): layer {name!r} is act-order (QLinear.in_perm); AWQ has no "
                             "g_idx: save it with format='gptq' (desc_act)")
        if layer.w_bits != 4:
            raise ValueError(f"save(format='awq'): layer {name!r} has {layer.w_bits}-bit weights; AWQ GEMM "
                             "stores 4-bit weights only (use format='gptq' or 'compressed-tensors')")
        if layer.w_group_size == -1:
            raise ValueError(f"save(format='awq'): layer {name!r} is quantized per channel; AWQ stores groups "
                             "of a positive group_size (use format='gptq' or 'compressed-tensors')")
        if layer.out_features % 8:
            raise ValueError(f"save(format='awq'): layer {name!r} has out_features={layer.out_features}; AWQ "
                             "packs 8 output columns per int32, so it must be a multiple of 8")
        sizes.setdefault(layer.w_group_size, name)
    if len(sizes) > 1:
        raise ValueError(f"save(format='awq'): an AWQ config holds one group_size for the model, got "
                         f"{sorted(sizes)} (e.g. layers {sorted(sizes.values())[:2]})")
    return next(iter(sizes))


def _layer_tensors(name: str, layer) -> dict:
    K = layer.in_features
    q = quant_format.unpack_bits(layer.qweight.cpu(), 4, K).to(torch.int64)
    zp = (layer.w_zero.cpu().to(torch.int64) if layer.w_zero is not None
          else torch.zeros(layer.w_scale.shape, dtype=torch.int64))
    out = {f"{name}.qweight": pack_columns((q + _MID).t()),
           f"{name}.qzeros": pack_columns((zp + _MID).t()),
           f"{name}.scales": layer.w_scale.detach().cpu().t().contiguous()}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().cpu().clone()
    return out


def prepare(model: nn.Module):
    layers = _folder.quantized_layers(model, NAME)
    if getattr(model, "llmeq_kv_config", None) is not None:
        raise ValueError("save(format='awq'): the model has a SimQuant KV cache, which an AWQ config cannot say")
    g = _check(layers)
    skipped = _folder.float_linears(model, layers)
    qconfig = {"quant_method": QUANT_METHOD, "bits": 4, "group_size": g, "zero_point": True, "version": "gemm",
               "modules_to_not_convert": skipped}

    return _folder.folder_writer(model, layers, _layer_tensors, qconfig)


# ---------------------------------------------------------------------- read
def _parse(path: Path, qc: dict) -> int:
    def bad(msg):
        raise FolderError(f"load: {path}/config.json (awq): {msg}")

    bits, g = qc.get("bits", qc.get("w_bit", 4)), qc.get("group_size", qc.get("q_group_size", 128))
    if bits != 4 or isinstance(bits, bool):
        bad(f"expected bits 4 (AWQ GEMM), got {bits!r}")
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        bad(f"expected a positive group_size, got {g!r}")
    version = qc.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        bad(f"version {version!r} is not read here (expected 'gemm'; GEMV / Marlin / ExLlama layouts differ)")
    if not isinstance(qc.get("zero_point", True), bool):
        bad(f"zero_point must be a boolean, got {qc.get('zero_point')!r}")
    return g


def read(path: Path, qc: dict, trust_remote_code: bool):
    g = _parse(path, qc)
    header, where = _folder.read_headers(path)
    config = _folder.load_config(path, trust_remote_code)
    modules, build = _folder.linear_names(config, trust_remote_code)
    layers = _folder.packed_linears(path, header, modules, config, "an AWQ")
    names = list(layers)
    specs, want = {}, {}
    for name, m in layers.items():
        N, K = m.out_features, m.in_features
        if K % g or N % 8:
            raise FolderError(f"load: {path}: layer {name!r} is {N}x{K}; AWQ needs in_features divisible by "
                              f"group_size={g} and out_features by 8")
        sdt = header.get(f"{name}.scales", (torch.float16,))[0]
        want[name] = {f"{name}.qweight": (torch.int32, (K, N // 8)),
                      f"{name}.scales": (sdt, (K // g, N))}
        for opt, shape in ((f"{name}.qzeros", (K // g, N // 8)), (f"{name}.bias", (N,))):
            if opt in header:
                want[name][opt] = (header[opt][0] if opt.endswith("bias") else torch.int32, shape)
        specs[name] = dict(in_features=K, out_features=N, bias=f"{name}.bias" in header, w_bits=4,
                           w_group_size=g, w_symmetric=True, act=None,
                           w_scale_dtype=_folder.scale_storage(sdt, f"{name}.scales"),
                           bias_dtype=str(header.get(f"{name}.bias", (torch.float32,))[0]).replace("torch.", ""))
    _folder.check_layer_tensors(path, header, want)
    tensors = _folder.read_tensors(path, where, header.keys())
    converted = {}
    for name in names:
        t = {k: tensors[k] for k in want[name]}
        q = unpack_columns(t[f"{name}.qweight"]).t() - _MID
        zk = f"{name}.qzeros"
        # no zeros stored (zero_point=false): the midpoint, what AWQ's symmetric kernels assume
        zp = unpack_columns(t[zk]).t() - _MID if zk in t else torch.zeros(q.shape[0], q.shape[1] // g,
                                                                           dtype=torch.int64)
        sym = bool((zp == 0).all())
        specs[name]["w_symmetric"] = sym
        sc = t[f"{name}.scales"]
        out = {f"{name}.qweight": quant_format.pack_bits(q.to(torch.int8), 4),
               f"{name}.w_scale": (sc.float() if sc.dtype == torch.bfloat16 else sc).t().contiguous()}
        if not sym:
            out[f"{name}.w_zero"] = zp.to(torch.int8).contiguous()
        if f"{name}.bias" in t:
            out[f"{name}.bias"] = t[f"{name}.bias"]
        converted[name] = out
    return _folder.load_converted(path, config, header, specs, want, tensors, converted, build)
