"""compressed-tensors folders (``quantization_config.quant_method =
"compressed-tensors"``): what vLLM, SGLang and transformers read.

The mapping, read from compressed-tensors 0.20.1
(``compressors/pack_quantized/{base,helpers}.py``,
``compressors/naive_quantized/base.py``, ``quantization/lifecycle/forward.py``,
``quantization/utils/helpers.py``, ``quantization/quant_args.py``):

* Integer convention: the same as ours. ``calculate_range`` gives int
  ``b``-bit values ``q`` in ``[-2^(b-1), 2^(b-1)-1]`` (signed) and
  ``_dequantize`` computes ``x = scale * (q - zero_point)``: our ``q``,
  ``w_scale`` and ``w_zero`` are stored as they are, no offset, no sign flip.
* ``pack-quantized`` (weight-only, and any sub-8-bit weights): ``weight_packed``
  int32 ``[N, ceil(K*b/32)]`` = ``pack_to_int32(q)``, which adds ``2^(b-1)``
  (``offset``) to make the codes unsigned and packs them LSB first along K
  (:mod:`.int32_pack`; 32 codes in ``b`` words, for b = 2/4/8 ``32/b`` per
  word); ``weight_shape`` int64 ``[N, K]``; ``weight_scale`` ``[N, G]``;
  asymmetric: ``weight_zero_point`` int32 ``[ceil(N*b/32), G]`` = the
  zero-points offset the same way and packed along N (``packed_dim=0``).
* ``int-quantized`` (weights with quantized activations, W8A8): ``weight``
  int8 ``[N, K]`` holding ``q`` as is; ``weight_scale`` ``[N, G]``;
  asymmetric: ``weight_zero_point`` int8 ``[N, G]`` (not packed).
* Granularity: ``strategy="channel"`` (``G = 1``) is our ``w_group_size=-1``,
  ``strategy="group", group_size=g`` is ours (groups along K, ``g | K``).
* Activations: our ``act="dynamic"`` (per-token 8-bit, symmetric or not) is
  ``input_activations = {num_bits: 8, type: int, strategy: token, dynamic:
  true, symmetric: act_symmetric}``. Note that the two rules choose different
  per-token scales: ours is ``absmax / 127`` (as vLLM's
  ``scaled_int8_quant``), compressed-tensors' own fake quantization
  (``calculate_qparams``, what plain transformers runs) uses ``absmax /
  127.5`` (``bit_range / 2`` with ``bit_range = 127 - (-128)``) clamped to
  ``[-128, 127]``. The stored model is the same; a transformers forward
  rounds the activations on a slightly finer grid (tests/test_formats.py
  reproduces its logits exactly with that one rule swapped in).
  Our ``act="static"`` (one calibrated per-tensor scale, SmoothQuant) is
  ``input_activations = {..., strategy: tensor, dynamic: false}`` with
  ``input_scale`` ``[1]`` (+ ``input_zero_point`` int8 ``[1]`` asymmetric).
  We round ``round(x / s) + zp`` (as vLLM's ``static_scaled_int8_quant``
  with ``azp``), compressed-tensors' fake quantization ``round(x / s + zp)``:
  the same integers except at exact halves with an odd zero-point.
* Scales are written in the dtype the layer holds (float32, or float16 with
  ``w_scale_dtype="float16"``): the file holds exactly the pair our quantizer
  chose. An engine that casts them to its compute dtype rounds them there.

What the format cannot say raises ``ValueError`` on save, naming the layer:
3-bit weights (compressed-tensors 0.20 packs 32 3-bit codes densely across
words, older releases 10 per word: a reader's version decides the layout),
EMA activation scales (a scale that moves with every batch: the format's
static scales are frozen, its dynamic ones per token), the SimQuant KV cache (``kv_cache_scheme``
holds static per-tensor/per-head scales, not per-channel chunked keys), and
GPT-2 Conv1D layers. Reading refuses the same, plus transforms, sparsity,
float/fp8 schemes and per-tensor or block weight strategies.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .. import quant_format
from ..checkpoint_checks import FolderError
from . import _folder, int32_pack

NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
# the compressed-tensors release whose layout this module follows (recorded
# in the config as compressed-tensors itself records its version)
LAYOUT_VERSION = "0.20.1"
PACKED, INT = "pack-quantized", "int-quantized"
_READ_FORMATS = (PACKED, INT, "naive-quantized")
_WEIGHT_KEYS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
                "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}


# --------------------------------------------------------------------- write
def _scheme(name: str, layer) -> tuple:
    if layer.w_bits not in int32_pack.PACKABLE_BITS:
        raise ValueError(f"save(format='compressed-tensors'): layer {name!r} has {layer.w_bits}-bit weights; "
                         f"this writer stores {int32_pack.PACKABLE_BITS} bits (3-bit packing differs between "
                         "compressed-tensors releases)")
    if layer.in_perm is not None:
        raise ValueError(f"save(format='compressed-tensors'): layer {name!r} is act-order (QLinear.in_perm); "
                         f"compressed-tensors {LAYOUT_VERSION} has no g_idx (its actorder 'group' was removed): "
                         "save it with format='gptq' (desc_act)")
    if layer.act not in (None, "dynamic", "static"):
        raise ValueError(f"save(format='compressed-tensors'): layer {name!r} has act={layer.act!r}; the format "
                         "holds weight-only layers, dynamic per-token and static per-tensor activation scales, "
                         "not EMA activation scales (they move with every batch); freeze them as static first")
    return (layer.w_bits, layer.w_group_size, layer.w_symmetric, layer.act, layer.act_symmetric)


def _scheme_json(key: tuple, targets: list) -> dict:
    bits, g, sym, act, act_sym = key
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if g == -1 else "group", "group_size": None if g == -1 else g}
    inputs = None if act is None else {"num_bits": 8, "type": "int", "symmetric": act_sym,
                                       "dynamic": act == "dynamic", "strategy": "token" if act == "dynamic" else
                                       "tensor", "group_size": None}
    return {"targets": targets, "weights": weights, "input_activations": inputs, "output_activations": None,
            "format": INT if act is not None and bits == 8 else PACKED}


def _layer_tensors(name: str, layer, fmt: str) -> dict:
    N, K = layer.out_features, layer.in_features
    # on the CPU: the files are written from there (a model on a GPU is copied layer by layer)
    q = quant_format.unpack_bits(layer.qweight.cpu(), layer.w_bits, K).to(torch.int8)
    off = 1 << (layer.w_bits - 1)
    zero = None if layer.w_zero is None else layer.w_zero.detach().cpu()
    out = {f"{name}.weight_scale": layer.w_scale.detach().cpu().clone()}
    if fmt == INT:
        out[f"{name}.weight"] = q.contiguous()
        if zero is not None:
            out[f"{name}.weight_zero_point"] = zero.clone()
    else:
        out[f"{name}.weight_packed"] = int32_pack.pack(q.to(torch.int64) + off, layer.w_bits, dim=1)
        out[f"{name}.weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
        if zero is not None:
            out[f"{name}.weight_zero_point"] = int32_pack.pack(zero.to(torch.int64) + off, layer.w_bits, dim=0)
    if layer.act == "static":
        out[f"{name}.input_scale"] = layer.act_scale.detach().cpu().clone()
        if not layer.act_symmetric:
            out[f"{name}.input_zero_point"] = layer.act_zero.detach().cpu().clone()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().cpu().clone()
    return out


def prepare(model: nn.Module):
    """Check everything the format must say (``ValueError`` naming the layer
    otherwise) and return ``write(folder)``."""
    layers = _folder.quantized_layers(model, NAME)
    if getattr(model, "llmeq_kv_config", None) is not None:
        raise ValueError("save(format='compressed-tensors'): the model has a SimQuant KV cache; "
                         "compressed-tensors' kv_cache_scheme holds static per-tensor / per-head scales, which "
                         "cannot say SimQuant's per-channel chunked keys and per-token values")
    groups: dict[tuple, list] = {}
    for name, layer in layers.items():
        groups.setdefault(_scheme(name, layer), []).append(name)
    float_linears = _folder.float_linears(model, layers)
    single = len(groups) == 1
    config_groups, layer_fmt = {}, {}
    for i, (key, names) in enumerate(groups.items()):
        # one scheme: the usual "Linear" target + ignore list; several: the layers by name
        scheme = _scheme_json(key, ["Linear"] if single else names)
        config_groups[f"group_{i}"] = scheme
        layer_fmt.update({n: scheme["format"] for n in names})
    fmts = set(layer_fmt.values())
    qconfig = {"config_groups": config_groups, "format": fmts.pop() if len(fmts) == 1 else "mixed-precision",
               "global_compression_ratio": None, "ignore": float_linears, "kv_cache_scheme": None,
               "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {},
               "transform_config": {}, "version": LAYOUT_VERSION}

    return _folder.folder_writer(model, layers, lambda name, layer: _layer_tensors(name, layer, layer_fmt[name]),
                                 qconfig)


# ---------------------------------------------------------------------- read
def _bad(path, msg):
    raise FolderError(f"load: {path}/config.json (compressed-tensors): {msg}")


def _match(name: str, module: nn.Module, target) -> bool:
    # compressed_tensors.utils.match: "re:" -> re.match on the name, else the
    # exact name or a class name in the module's MRO
    if not isinstance(target, str):
        return False
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error as err:
            raise FolderError(f"load: compressed-tensors target {target!r} is not a valid regex ({err})") from err
    return target == name or any(c.__name__ == target for c in type(module).__mro__)


def _parse_weights(path, gname: str, w) -> tuple[int, int, bool]:
    if not isinstance(w, dict):
        _bad(path, f"group {gname!r}: expected a 'weights' object, got {type(w).__name__}")
    unknown = set(w) - _WEIGHT_KEYS
    if unknown:
        _bad(path, f"group {gname!r}: unknown weight fields {sorted(unknown)}")
    bits, typ, strat = w.get("num_bits", 8), w.get("type", "int"), w.get("strategy")
    if typ != "int":
        _bad(path, f"group {gname!r}: {typ} weights are not read here (expected type 'int')")
    if bits not in int32_pack.PACKABLE_BITS or isinstance(bits, bool):
        _bad(path, f"group {gname!r}: expected num_bits in {int32_pack.PACKABLE_BITS}, got {bits!r}")
    if w.get("dynamic", False) is not False or w.get("block_structure") is not None:
        _bad(path, f"group {gname!r}: dynamic or block-wise weights are not read here")
    if not isinstance(w.get("symmetric", True), bool):
        _bad(path, f"group {gname!r}: symmetric must be a boolean, got {w.get('symmetric')!r}")
    g = w.get("group_size")
    if strat == "channel" or (strat is None and g == -1):
        g = -1
    elif strat == "group" or (strat is None and isinstance(g, int) and g > 0):
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            _bad(path, f"group {gname!r}: strategy 'group' needs a positive group_size, got {g!r}")
    else:
        _bad(path, f"group {gname!r}: weight strategy {strat!r} is not read here (expected 'channel' or 'group')")
    # compressed-tensors (validate_actorder) reads false as null and refuses true / "group" / "dynamic"
    # (the g_idx orderings, gone by 0.19.0): so do we
    actorder = w.get("actorder")
    if actorder is not False and actorder not in (None, "weight", "static"):
        _bad(path, f"group {gname!r}: actorder {actorder!r} (a g_idx column order) is not read here; "
                   "actorder 'weight' / 'static' (calibration order only), false and null are")
    zp = w.get("zp_dtype")
    if zp not in (None, "torch.int8", "int8"):
        _bad(path, f"group {gname!r}: expected int8 zero-points, got zp_dtype {zp!r}")
    return bits, g, w.get("symmetric", True)


def _parse_inputs(path, gname: str, a):
    if a is None:
        return None, True
    kind = None
    if isinstance(a, dict) and a.get("type", "int") == "int" and a.get("num_bits", 8) == 8 \
            and isinstance(a.get("symmetric", True), bool):
        kind = {("token", True): "dynamic", ("tensor", False): "static"}.get((a.get("strategy"), a.get("dynamic")))
    if kind is None:
        _bad(path, f"group {gname!r}: input_activations {a!r} are not read here (expected 8-bit int, strategy "
                   "'token' with dynamic true, or strategy 'tensor' with dynamic false)")
    return kind, a.get("symmetric", True)


def _parse(path: Path, qc: dict) -> tuple[list, dict]:
    for key in ("kv_cache_scheme",):
        if qc.get(key) is not None:
            _bad(path, f"{key} is set; a compressed-tensors quantized KV cache is not read here")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            _bad(path, f"{key} is set; sparse or transformed (rotated) models are not read here")
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        _bad(path, "expected a non-empty 'config_groups' object")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        _bad(path, f"'ignore' must be a list of strings, got {ignore!r}")
    out = []
    for gname, s in groups.items():
        if not isinstance(s, dict):
            _bad(path, f"group {gname!r}: preset scheme names are not read here; expected a scheme object")
        targets = s.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            _bad(path, f"group {gname!r}: 'targets' must be a list of strings, got {targets!r}")
        if s.get("output_activations") is not None:
            _bad(path, f"group {gname!r}: output activation quantization is not read here")
        bits, g, sym = _parse_weights(path, gname, s.get("weights"))
        act, act_sym = _parse_inputs(path, gname, s.get("input_activations"))
        gfmt = s.get("format") or fmt
        if gfmt in (None, "mixed-precision"):  # compressed-tensors' own inference (compressors/format.py)
            gfmt = INT if act is not None else PACKED
        if gfmt not in _READ_FORMATS:
            _bad(path, f"group {gname!r}: format {gfmt!r} is not read here (expected one of {_READ_FORMATS})")
        out.append((gname, targets, dict(bits=bits, group_size=g, sym=sym, act=act, act_sym=act_sym,
                                         packed=gfmt == PACKED)))
    return out, {"ignore": ignore}


def _expected(name, s, N, K, header):
    bits, g = s["bits"], s["group_size"]
    G = 1 if g == -1 else K // g
    sk = f"{name}.weight_scale"
    sdt = header[sk][0] if sk in header else torch.float32
    want = {sk: (sdt, (N, G))}
    if s["packed"]:
        want[f"{name}.weight_packed"] = (torch.int32, (N, int32_pack.packed_len(K, bits)))
        shk = f"{name}.weight_shape"
        want[shk] = (header[shk][0] if shk in header and header[shk][0] in (torch.int32, torch.int64)
                     else torch.int64, (2,))
        zshape, zdt = (int32_pack.packed_len(N, bits), G), torch.int32
    else:
        want[f"{name}.weight"] = (torch.int8, (N, K))
        zshape, zdt = (N, G), torch.int8
    zk = f"{name}.weight_zero_point"
    if not s["sym"] or zk in header:  # a symmetric file may carry (zero) zero-points
        want[zk] = (zdt, zshape)
    if s["act"] == "static":
        ik = f"{name}.input_scale"
        want[ik] = (header[ik][0] if ik in header and header[ik][0].is_floating_point else torch.float32, (1,))
        if not s["act_sym"] or f"{name}.input_zero_point" in header:
            want[f"{name}.input_zero_point"] = (torch.int8, (1,))
    bk = f"{name}.bias"
    if bk in header:
        want[bk] = (header[bk][0], (N,))
    return want


def _to_native(name, s, N, K, t, path) -> dict:
    bits = s["bits"]
    off = 1 << (bits - 1)
    qmin, qmax = quant_format.qrange(bits)
    if s["packed"]:
        shape = t[f"{name}.weight_shape"].tolist()
        if shape != [N, K]:
            raise FolderError(f"load: {path}: {name}.weight_shape is {shape}, the model needs {[N, K]}")
        q = int32_pack.unpack(t[f"{name}.weight_packed"], bits, K, dim=1) - off
    else:
        q = t[f"{name}.weight"].to(torch.int64)
        if q.numel() and (q.min() < qmin or q.max() > qmax):
            raise FolderError(f"load: {path}: {name}.weight holds values outside the {bits}-bit range "
                              f"[{qmin}, {qmax}]")
    out = {f"{name}.qweight": quant_format.pack_bits(q.to(torch.int8), bits)}
    scale = t[f"{name}.weight_scale"]
    out[f"{name}.w_scale"] = scale.float() if scale.dtype == torch.bfloat16 else scale
    zk = f"{name}.weight_zero_point"
    if zk in t:
        z = t[zk]
        G = scale.shape[1]
        z = int32_pack.unpack(z, bits, N, dim=0) - off if s["packed"] else z.to(torch.int64)
        z = z.reshape(N, G)
        if s["sym"]:
            if z.numel() and z.abs().max() != 0:
                raise FolderError(f"load: {path}: {zk} of a symmetric scheme holds non-zero zero-points")
        else:
            out[f"{name}.w_zero"] = z.to(torch.int8)  # range checked by QLinear.check_values
    if s["act"] == "static":  # QLinear keeps a float32 scale and an int8 zero-point (0 when symmetric)
        out[f"{name}.act_scale"] = t[f"{name}.input_scale"].float()
        zero = t.get(f"{name}.input_zero_point", torch.zeros(1, dtype=torch.int8))
        if s["act_sym"] and int(zero.abs().max()) != 0:
            raise FolderError(f"load: {path}: {name}.input_zero_point of a symmetric scheme is not 0")
        out[f"{name}.act_zero"] = zero
    if f"{name}.bias" in t:
        out[f"{name}.bias"] = t[f"{name}.bias"]
    return out


def read(path: Path, qc: dict, trust_remote_code: bool):
    groups, extra = _parse(path, qc)
    header, where = _folder.read_headers(path)
    config = _folder.load_config(path, trust_remote_code)
    # which Linear holds which scheme: compressed-tensors' matching, first group wins
    modules, build = _folder.linear_names(config, trust_remote_code)
    schemes = {}
    for name, m in modules.items():
        if not isinstance(m, nn.Linear) or any(_match(name, m, i) for i in extra["ignore"]):
            continue
        for _, targets, s in groups:
            if any(_match(name, m, t) for t in targets):
                schemes[name] = s
                break
    if not schemes:
        _bad(path, "its config_groups match no Linear layer of this model")
    specs, want = {}, {}
    for name, s in schemes.items():
        m = modules[name]
        N, K = m.out_features, m.in_features
        if s["group_size"] != -1 and K % s["group_size"]:
            raise FolderError(f"load: {path}: layer {name!r} has in_features={K}, not a multiple of "
                              f"group_size={s['group_size']}")
        want[name] = _expected(name, s, N, K, header)
        bias_dt = want[name].get(f"{name}.bias", (torch.float32,))[0]
        specs[name] = dict(in_features=K, out_features=N, bias=f"{name}.bias" in header, w_bits=s["bits"],
                           w_group_size=s["group_size"], w_symmetric=s["sym"], act=s["act"],
                           act_symmetric=s["act_sym"],
                           w_scale_dtype=_folder.scale_storage(want[name][f"{name}.weight_scale"][0],
                                                               f"{name}.weight_scale"),
                           bias_dtype=str(bias_dt).replace("torch.", ""))
    dtype = _folder.float_dtype(header, tuple(f"{n}." for n in specs))
    model = _folder.build_checked(path, config, header, specs, want, lambda: build(dtype))
    tensors = _folder.read_tensors(path, where, header.keys())
    state = {k: v for k, v in tensors.items() if not k.startswith(tuple(f"{n}." for n in specs))}
    for name, s in schemes.items():
        m = modules[name]
        state.update(_to_native(name, s, m.out_features, m.in_features,
                                {k: tensors[k] for k in want[name]}, path))
    return _folder.finish(model, state, path)
