"""GPTQ folders (``quantization_config.quant_method = "gptq"``), the layout of
AutoGPTQ / GPTQModel that vLLM (gptq, gptq_marlin), SGLang and TGI read.

The mapping, per quantized ``nn.Linear`` ``name`` with ``N`` outputs, ``K``
inputs, ``b`` bits (2, 4 or 8), ``G`` groups:

* unsigned codes: GPTQ dequantizes ``w[k, n] = scales[g, n] * (qw_u[k, n] -
  zp_u[g, n])`` with ``g = g_idx[k]`` and unsigned ``qw_u, zp_u`` in
  ``[0, 2^b)``. Ours is ``s * (q - zp)`` with signed ``q, zp`` in
  ``[-2^(b-1), 2^(b-1))``, so ``qw_u = q + 2^(b-1)``, ``zp_u = zp + 2^(b-1)``
  (symmetric: ``zp = 0``, ``zp_u = 2^(b-1)``) — the same products exactly.
* ``qweight`` int32 ``[K*b/32, N]``: the codes of column ``n`` packed along K,
  ``32/b`` per word, LSB first (code ``k`` at bits ``b*(k % (32/b))`` of word
  ``k // (32/b)``). The transpose of our ``[N, K]``.
* ``qzeros`` int32 ``[G, N*b/32]``: packed along N the same way. Format v1
  (``checkpoint_format`` absent or ``"gptq"``, what the engines read) stores
  ``zp_u - 1`` and its readers add 1 back; v2 (``"gptq_v2"``, GPTQModel's
  internal format) stores ``zp_u``. So v1 cannot hold ``zp_u = 0`` (our
  ``zp = qmin``: a group whose range starts at 0): saving raises then.
* ``scales`` ``[G, N]`` in the layer's scale dtype (float32, or float16 with
  ``w_scale_dtype="float16"``, the dtype GPTQ kernels compute in: an engine
  casting float32 scales rounds them itself).
* ``g_idx`` int32 ``[K]``: the group of input column ``k``; ``k //
  group_size`` for layers whose groups are contiguous runs of K. Act-order
  (``desc_act=true``) checkpoints give each group ``group_size`` columns in
  any order: QLinear holds them with ``in_perm`` (the stable sort of
  ``g_idx``; held column ``j`` = input column ``in_perm[j]``; a g_idx says
  which group a column is in, not where inside it, so inside a group the
  columns are held ascending), and a layer with
  ``in_perm`` is written back with ``desc_act=true`` and its ``g_idx``.
  Per-channel (ours ``-1``) is GPTQ's ``group_size=-1``: one group, ``g_idx``
  all 0.
* ``bias``: as the layer holds it.

Save raises ``ValueError`` for what GPTQ cannot say: quantized activations
(GPTQ is weight-only), 3-bit (packed across words in a layout of its own, not
written here), layers of different widths / group sizes / symmetry (one
config for the model), ``K`` or ``N`` not a multiple of ``32/b``, a v1
zero-point of 0, GPT-2 Conv1D layers. Load refuses a ``g_idx`` that does not
give every group ``group_size`` columns.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .. import quant_format
from ..checkpoint_checks import FolderError
from . import _folder, int32_pack

NAME = "gptq"
QUANT_METHOD = "gptq"


# --------------------------------------------------------------------- write
def _config_of(layers: dict) -> tuple[int, int, bool]:
    keys = {}
    for name, layer in layers.items():
        if layer.act is not None:
            raise ValueError(f"save(format='gptq'): layer {name!r} has act={layer.act!r}; GPTQ checkpoints are "
                             "weight-only (save W8A8 models with format='compressed-tensors')")
        if layer.w_bits not in int32_pack.PACKABLE_BITS:
            raise ValueError(f"save(format='gptq'): layer {name!r} has {layer.w_bits}-bit weights; this writer "
                             f"stores {int32_pack.PACKABLE_BITS} bits (GPTQ's 3-bit packing is not written)")
        per = 32 // layer.w_bits
        if layer.in_features % per or layer.out_features % per:
            raise ValueError(f"save(format='gptq'): layer {name!r} is {layer.out_features}x{layer.in_features}; "
                             f"GPTQ packs {per} {layer.w_bits}-bit values per int32 along both in_features "
                             f"(qweight) and out_features (qzeros), so both must be multiples of {per}")
        keys.setdefault((layer.w_bits, layer.w_group_size, layer.w_symmetric), []).append(name)
    if len(keys) > 1:
        desc = "; ".join(f"{len(v)} layer(s) bits={k[0]} group_size={k[1]} sym={k[2]} (e.g. {v[0]!r})"
                         for k, v in keys.items())
        raise ValueError(f"save(format='gptq'): a GPTQ config holds one bits / group_size / sym for the model, "
                         f"got {desc}; use format='compressed-tensors' for mixed layers")
    return next(iter(keys))


def _layer_tensors(name: str, layer) -> dict:
    N, K, b = layer.out_features, layer.in_features, layer.w_bits
    off = 1 << (b - 1)
    q = quant_format.unpack_bits(layer.qweight.cpu(), b, K).to(torch.int64)
    perm = layer.in_perm.cpu() if layer.in_perm is not None else None
    if perm is not None:  # GPTQ keeps the input's column order and says the groups in g_idx
        q_in = torch.empty_like(q)
        q_in[:, perm] = q
        q = q_in
    zp = layer.w_zero.cpu().to(torch.int64) if layer.w_zero is not None else torch.zeros(layer.w_scale.shape,
                                                                                     dtype=torch.int64)
    stored = zp + off - 1  # v1: zp_u - 1
    if (stored < 0).any():
        n, g = (stored < 0).nonzero()[0].tolist()
        raise ValueError(f"save(format='gptq'): layer {name!r}, output {n}, group {g}: zero-point {zp[n, g].item()}"
                         f" (unsigned 0) cannot be stored in GPTQ v1, which stores zero-point - 1 as an unsigned "
                         f"{b}-bit value; use format='compressed-tensors'")
    G = layer.w_scale.shape[1]
    gsize = K if layer.w_group_size == -1 else layer.w_group_size
    out = {f"{name}.qweight": int32_pack.pack((q + off).t(), b, dim=0),
           f"{name}.qzeros": int32_pack.pack(stored.t(), b, dim=1),
           f"{name}.scales": layer.w_scale.detach().cpu().t().contiguous(),
           f"{name}.g_idx": quant_format.g_idx_from_perm(perm, K, gsize)}
    assert out[f"{name}.scales"].shape == (G, N)
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().cpu().clone()
    return out


def prepare(model: nn.Module):
    layers = _folder.quantized_layers(model, NAME)
    if getattr(model, "llmeq_kv_config", None) is not None:
        raise ValueError("save(format='gptq'): the model has a SimQuant KV cache, which a GPTQ config cannot say")
    bits, g, sym = _config_of(layers)
    skipped = _folder.float_linears(model, layers)
    act_order = any(layer.in_perm is not None for layer in layers.values())
    qconfig = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": g, "desc_act": act_order, "sym": sym,
               "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq",
               "lm_head": "lm_head" in layers}
    rules = {f"-:^{re.escape(n)}$": {} for n in skipped if n != "lm_head"}
    if rules:  # GPTQModel / vLLM "dynamic": a "-:" rule leaves a matching module unquantized
        qconfig["dynamic"] = rules

    return _folder.folder_writer(model, layers, _layer_tensors, qconfig)


# ---------------------------------------------------------------------- read
def _parse(path: Path, qc: dict) -> dict:
    def bad(msg):
        raise FolderError(f"load: {path}/config.json (gptq): {msg}")

    bits, g = qc.get("bits"), qc.get("group_size", -1)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in int32_pack.PACKABLE_BITS:
        bad(f"expected bits in {int32_pack.PACKABLE_BITS}, got {bits!r}")
    if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or g > 0):
        bad(f"expected group_size -1 or > 0, got {g!r}")
    for key in ("desc_act", "sym"):
        if not isinstance(qc.get(key, key == "sym"), bool):
            bad(f"{key} must be a boolean, got {qc.get(key)!r}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        bad(f"checkpoint_format {fmt!r} is not read here (expected 'gptq' or 'gptq_v2')")
    dyn = qc.get("dynamic") or {}
    if not isinstance(dyn, dict) or any(not (isinstance(k, str) and k.startswith("-:")) for k in dyn):
        bad("per-module overrides in 'dynamic' are not read here (only '-:' rules that skip modules)")
    return dict(bits=bits, group_size=g, sym=qc.get("sym", True), v1=fmt == "gptq")


def read(path: Path, qc: dict, trust_remote_code: bool):
    cfg = _parse(path, qc)
    bits, b_off = cfg["bits"], 1 << (cfg["bits"] - 1)
    header, where = _folder.read_headers(path)
    config = _folder.load_config(path, trust_remote_code)
    modules, build = _folder.linear_names(config, trust_remote_code)
    layers = _folder.packed_linears(path, header, modules, config, "a GPTQ")
    names = list(layers)
    specs, want = {}, {}
    for name, m in layers.items():
        N, K = m.out_features, m.in_features
        g = K if cfg["group_size"] == -1 else cfg["group_size"]
        if K % g:
            raise FolderError(f"load: {path}: layer {name!r} has in_features={K}, not a multiple of group_size={g}")
        G = K // g
        sdt = header.get(f"{name}.scales", (torch.float16,))[0]
        want[name] = {f"{name}.qweight": (torch.int32, (int32_pack.packed_len(K, bits), N)),
                      f"{name}.qzeros": (torch.int32, (G, int32_pack.packed_len(N, bits))),
                      f"{name}.scales": (sdt, (G, N))}
        for opt, shape in ((f"{name}.g_idx", (K,)), (f"{name}.bias", (N,))):
            if opt in header:
                want[name][opt] = (header[opt][0] if opt.endswith("bias") else torch.int32, shape)
        specs[name] = dict(in_features=K, out_features=N, bias=f"{name}.bias" in header, w_bits=bits,
                           w_group_size=cfg["group_size"] if cfg["group_size"] == -1 else g, w_symmetric=True, act=None,
                           w_scale_dtype=_folder.scale_storage(sdt, f"{name}.scales"),
                           bias_dtype=str(header.get(f"{name}.bias", (torch.float32,))[0]).replace("torch.", ""))
    _folder.check_layer_tensors(path, header, want)  # shapes and dtypes before any tensor is read
    tensors = _folder.read_tensors(path, where, header.keys())
    # symmetry is a property of the stored zero-points: decided before the
    # layers are built (a "sym" file whose zeros are not the midpoint is read
    # as the asymmetric layer its kernels would run)
    converted = {}
    for name in names:
        t = {k: tensors[k] for k in want[name]}
        N, K = specs[name]["out_features"], specs[name]["in_features"]
        G = want[name][f"{name}.scales"][1][0]
        gi = t.get(f"{name}.g_idx")
        try:
            perm = None if gi is None else quant_format.perm_from_g_idx(gi, K // G)
        except ValueError as err:
            raise FolderError(f"load: {path}: {name}.g_idx: {err}") from err
        q = int32_pack.unpack(t[f"{name}.qweight"], bits, K, dim=0).t() - b_off
        if perm is not None:  # act order: held with contiguous groups, the input gathered (QLinear.in_perm)
            q = q[:, perm]
            specs[name]["in_perm"] = True
        zp_u = int32_pack.unpack(t[f"{name}.qzeros"], bits, N, dim=1).t() + (1 if cfg["v1"] else 0)
        if zp_u.numel() and zp_u.max() >= (1 << bits):
            n, g = (zp_u >= (1 << bits)).nonzero()[0].tolist()
            raise FolderError(f"load: {path}: {name}.qzeros output {n} group {g} gives the zero-point {2**bits} "
                              f"(v1 stores zero-point - 1), outside the {bits}-bit range")
        zp = zp_u - b_off
        sym = cfg["sym"] and bool((zp == 0).all())
        specs[name]["w_symmetric"] = sym
        sc = t[f"{name}.scales"]
        out = {f"{name}.qweight": quant_format.pack_bits(q.to(torch.int8), bits),
               f"{name}.w_scale": (sc.float() if sc.dtype == torch.bfloat16 else sc).t().contiguous()}
        if not sym:
            out[f"{name}.w_zero"] = zp.to(torch.int8).contiguous()
        if f"{name}.bias" in t:
            out[f"{name}.bias"] = t[f"{name}.bias"]
        if perm is not None:
            out[f"{name}.in_perm"] = perm
        converted[name] = out
    return _folder.load_converted(path, config, header, specs, want, tensors, converted, build)
