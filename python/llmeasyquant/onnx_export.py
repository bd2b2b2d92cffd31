"""ONNX export of quantized models (QDQ / integer ops), checked in ONNX Runtime.

``export_onnx(model, path)`` traces the model with ``torch.onnx.export``
(dynamo, opset 21) and translates our ops into standard ONNX:

* W8A8 dynamic (``dynamic_quant_linear``): per-token scale from
  ``ReduceMax(Abs(x))`` (or min/max for asymmetric activations),
  ``QuantizeLinear`` (per-row axis 0) -> ``MatMulInteger`` with the int8
  weight initializer (zero-point correction inside MatMulInteger) -> int32 ->
  ``Cast`` -> ``* (a_scale x w_scale)`` -> ``+ bias``: the same integer
  product and the same fp32 epilogue order as our kernels.
* weight-only (``weight_only_linear``): the int8 / INT4 weight initializer ->
  ``DequantizeLinear`` (per channel: axis 0; group-wise: opset-21 blocked
  quantization, axis 1, ``block_size`` = group) -> ``MatMul``.

Every quantized weight is an initializer named ``<layer>.qweight`` with
``<layer>.w_scale`` / ``<layer>.w_zero`` beside it, and the model's metadata
records the method config. Layers with static or EMA activation scales, and
W4A8 (simulated or on its int8 kernel), are not exported yet (clear error).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .models.experts import moe_facts
from .nn.qlinear import QLinear

OPSET = 21


def _translations():
    from onnxscript import opset21 as op
    import onnx

    def dynamic_quant_linear(x, w, w_scale, w_sum, bias=None, act_symmetric: bool = True):
        K = op.Shape(w, start=1, end=2)
        out_shape = op.Concat(op.Shape(x, start=0, end=-1), op.Shape(w, start=0, end=1), axis=0)
        x2 = op.Reshape(op.Cast(x, to=onnx.TensorProto.FLOAT), op.Concat(op.Constant(value_ints=[-1]), K, axis=0))
        one = op.Constant(value_float=1.0)
        zero_f = op.Constant(value_float=0.0)
        if act_symmetric:
            amax = op.ReduceMax(op.Abs(x2), op.Constant(value_ints=[1]), keepdims=0)
            s = op.Div(amax, op.Constant(value_float=127.0))
            s = op.Where(op.Equal(s, zero_f), one, s)
            zp = op.Cast(op.Mul(s, zero_f), to=onnx.TensorProto.INT8)  # zeros, one per row
        else:
            lo = op.Min(op.ReduceMin(x2, op.Constant(value_ints=[1]), keepdims=0), zero_f)
            hi = op.Max(op.ReduceMax(x2, op.Constant(value_ints=[1]), keepdims=0), zero_f)
            s = op.Div(op.Sub(hi, lo), op.Constant(value_float=255.0))
            s = op.Where(op.Equal(s, zero_f), one, s)
            zpf = op.Sub(op.Constant(value_float=-128.0), op.Round(op.Div(lo, s)))
            zpf = op.Clip(zpf, op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
            zp = op.Cast(zpf, to=onnx.TensorProto.INT8)
        q = op.QuantizeLinear(x2, s, zp, axis=0)
        # W [N, K] x q^T [K, M], transposed back: the int8 weight initializer
        # keeps its own name and layout (no folded transposed copy).
        acc = op.Transpose(op.MatMulInteger(w, op.Transpose(q, perm=[1, 0])), perm=[1, 0])
        if not act_symmetric:  # acc - zp[m] * sum_k w[n, k], in int32 as in the kernels
            zcol = op.Unsqueeze(op.Cast(zp, to=onnx.TensorProto.INT32), op.Constant(value_ints=[1]))
            acc = op.Sub(acc, op.Mul(zcol, w_sum))
        scale = op.Mul(op.Unsqueeze(s, op.Constant(value_ints=[1])), w_scale)
        y = op.Mul(scale, op.Cast(acc, to=onnx.TensorProto.FLOAT))
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=onnx.TensorProto.FLOAT))
        return op.CastLike(op.Reshape(y, out_shape), x)

    def weight_only_linear(x, qw, scale, zero_point=None, bits: int = 8, group_size: int = -1, bias=None):
        # qw arrives as the export-time int8 / INT4 initializer (see _prepare)
        if group_size == -1:
            s = op.Reshape(scale, op.Constant(value_ints=[-1]))
            w = op.DequantizeLinear(qw, s, op.Reshape(zero_point, op.Constant(value_ints=[-1]))
                                    if zero_point is not None else None, axis=0)
        else:
            w = op.DequantizeLinear(qw, scale, zero_point, axis=1, block_size=group_size)
        y = op.MatMul(op.Cast(x, to=onnx.TensorProto.FLOAT), op.Transpose(w, perm=[1, 0]))
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=onnx.TensorProto.FLOAT))
        return op.CastLike(y, x)

    ops = torch.ops.llmeasyquant
    return {ops.dynamic_quant_linear.default: dynamic_quant_linear,
            ops.weight_only_linear.default: weight_only_linear}


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).logits


def check_exportable(model: nn.Module) -> None:
    if moe_facts(model) is not None:
        raise ValueError(f"export_onnx: {model.config.model_type} is a mixture-of-experts model: its experts run "
                         "in a loop over the experts the router picked for the input (data-dependent control "
                         "flow), which an ONNX trace would fix to the example input's routing; not supported")
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            if m.act is not None and not (m.act == "dynamic" and m.int8_gemm):
                raise ValueError(
                    f"export_onnx: layer {name} uses act={m.act!r}"
                    f"{'' if m.int8_gemm else ' with a W' + str(m.w_bits) + 'A8 group-wise path'}; "
                    "ONNX export supports W8A8 with dynamic per-token activations (8-bit per-channel symmetric "
                    "weights) and weight-only layers")
            if m.act is None and m.storage_bits < 8 and m.in_features % 2:
                raise ValueError(f"export_onnx: {m.storage_bits}-bit layer {name} has odd in_features={m.in_features}")


def export_onnx(model: nn.Module, path: str, *, seq_len: Optional[int] = None, example_len: int = 16,
                max_seq_len: int = 4096) -> str:
    """Export the prefill graph (input_ids [batch, seq] -> logits) to ``path``.
    ``seq_len=None``: dynamic sequence length (2 .. max_seq_len); else fixed."""
    import onnx

    check_exportable(model)
    model.eval()
    n = seq_len or example_len
    ids = torch.randint(0, model.config.vocab_size, (2, n))
    batch = torch.export.Dim("batch", min=1, max=1024)
    dyn = ({0: batch},) if seq_len else ({0: batch, 1: torch.export.Dim("seq", min=2, max=max_seq_len)},)
    wrapper = _LogitsOnly(model).eval()
    with _onnx_int4_weights(model):
        prog = torch.onnx.export(wrapper, (ids,), dynamo=True, opset_version=OPSET, dynamic_shapes=dyn,
                                 custom_translation_table=_translations(), optimize=False, verbose=False)
    proto = prog.model_proto
    _store_int4(proto, model)
    cfg = getattr(model, "llmeq_config", None)
    meta = {"llmeasyquant.method": json.dumps(None if cfg is None else cfg.to_dict()),
            "llmeasyquant.layers": json.dumps({k: m.spec() for k, m in model.named_modules() if isinstance(m, QLinear)})}
    for k, v in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(proto, full_check=False)
    tmp = f"{path}.tmp{os.getpid()}"
    onnx.save_model(proto, tmp)
    os.replace(tmp, path)
    return path


def _store_int4(proto, model: nn.Module) -> None:
    """4-bit layers' weights (and zero-points) become ONNX INT4 initializers
    (two values per byte, as in our storage), halving the file against int8.
    2- and 3-bit layers are stored as INT4 too: opset 21 has no narrower
    integer type, so their ONNX file is as large as a 4-bit one."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    four = {f"model.{name}" for name, m in model.named_modules() if isinstance(m, QLinear) and m.storage_bits < 8}
    inits = {t.name: i for i, t in enumerate(proto.graph.initializer)}
    for prefix in four:
        for suffix in ("qweight", "w_zero"):
            i = inits.get(f"{prefix}.{suffix}")
            if i is None:
                continue
            t = proto.graph.initializer[i]
            vals = numpy_helper.to_array(t).astype(np.int8)
            if vals.min(initial=0) < -8 or vals.max(initial=0) > 7:
                raise ValueError(f"export_onnx: {t.name} holds values outside [-8, 7]")
            proto.graph.initializer[i].CopyFrom(
                onnx.helper.make_tensor(t.name, onnx.TensorProto.INT4, list(vals.shape), vals.flatten().tolist()))


def ort_session(path: str):
    """An ONNX Runtime CPU session for an exported model. Graph optimizations
    stay at BASIC: ORT's extended level rewrites DequantizeLinear + MatMul
    into a kernel that also quantizes the activations (about 1 % logit error
    on weight-only models), which is not the model we exported."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# the text check_against_torch runs through both models (about 40 tokens, every
# tokenizer has them): the check is about the graph, not about the data
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. " * 4


@dataclass(frozen=True)
class TorchCheck:
    max_abs_diff: float  # largest |ONNX Runtime logit - PyTorch logit|
    tokens: int  # sequence length the models ran


def check_against_torch(model: nn.Module, tokenizer, onnx_path: str, *, seq_len: Optional[int] = None,
                        text: str = CHECK_TEXT) -> TorchCheck:
    """Run ``text`` through the exported ``onnx_path`` in ONNX Runtime and
    through ``model`` in PyTorch; the largest logit difference. ``seq_len``:
    the fixed length the model was exported with (None: dynamic; the whole
    text runs)."""
    import numpy as np

    ids = tokenizer(text, return_tensors="pt").input_ids
    ids = ids[:, :seq_len] if seq_len else ids
    if seq_len and ids.shape[1] != seq_len:
        raise ValueError(f"check_against_torch: expected text of at least seq_len={seq_len} tokens, "
                         f"got {ids.shape[1]}")
    out = ort_session(onnx_path).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    return TorchCheck(max_abs_diff=float(np.abs(out - ref).max()), tokens=ids.shape[1])


class _onnx_int4_weights:
    """During export, packed 2/3/4-bit weights are presented unpacked as int8 [N, K]
    (ONNX's INT4 packing order differs from ours only in container type; the
    exporter stores int8). Restores the packed buffers afterwards."""

    def __init__(self, model):
        self.model = model
        self.saved = []

    def __enter__(self):
        from .quant_format import unpack_bits

        for m in self.model.modules():
            if isinstance(m, QLinear) and m.storage_bits < 8:
                self.saved.append((m, m.qweight, m.storage_bits))
                m.qweight = unpack_bits(m.qweight, m.storage_bits, m.in_features)
                m.storage_bits = 8
        return self

    def __exit__(self, *exc):
        for m, q, b in self.saved:
            m.qweight = q
            m.storage_bits = b
        return False
