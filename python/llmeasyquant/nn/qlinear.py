"""QLinear: a drop-in quantized replacement for ``nn.Linear`` (and GPT-2's ``Conv1D``).

It holds integer weights with their scales/zero-points and an activation mode:

* ``act=None`` - weight-only (W8A16 / W4A16): float activations, the weight is
  dequantized inside the kernel.
* ``act="dynamic"`` - W8A8 with per-token activation scales computed on the fly
  (paper Algorithm 2, one fused op).
* ``act="static"`` - W8A8 with one calibrated per-tensor activation scale
  (set it with :meth:`QLinear.set_static_range`).
* ``act="ema"`` - W8A8 with an online per-tensor scale tracked by an
  exponential moving average of the activation range (paper Algorithm 1),
  updated on every forward unless :attr:`ema_update` is False.

W8A8 runs on the int8 GEMM with 8-bit per-channel symmetric weights (what its
epilogue folds in); dynamic W8A8 on AVX-512 VNNI CPUs from a derived copy of
the weight in the kernel's panel layout (:meth:`QLinear._cpu_packed`). W4A8 with dynamic symmetric activations (ZeroQuant, rotated
GPTQ) runs on the W4A8 kernel where it has a SIMD path (``ops.w4a8_fast``: the
CPU's AVX2 tier, groups of a multiple of 32): an exact int32 product per
weight group, group scales in fp32 after it.
Other weight layouts with quantized activations, and W4A8 elsewhere, are
simulated (quantize-dequantize activations, then the weight-only kernel: the
same real number, one rounding more).

``in_perm=True`` (act-order checkpoints, GPTQ ``desc_act``): the layer holds
its weight columns in a permuted order ``in_perm`` so that each quantization
group is contiguous, and gathers the input columns the same way,
``y = x[..., in_perm] @ W_held.T + b``; :meth:`QLinear.dequantize` returns the
weight in the input's own order, so the layer stays a drop-in ``nn.Linear``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .. import cpu_pack, ops, panel, quant_format

ACT_MODES = (None, "dynamic", "static", "ema")


def _tensor_key(t: torch.Tensor) -> tuple:
    """What a cache derived from ``t`` is valid for: its storage and, outside
    inference mode (no version counters there), its in-place edit count."""
    return (t.data_ptr(), None if t.is_inference() else t._version)
# Buffers whose dtype is part of the layer's definition: a module cast
# (model.half(), model.to(torch.bfloat16)) moves them but never changes their
# dtype (fp16 would flush small scales to 0; the kernels take fp32 state).
_FIXED_DTYPE_BUFFERS = ("w_scale", "act_scale", "ema_state")
_BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel layouts derived from the weights (plain attributes, never saved):
# (key, value) pairs, value a tensor, a tuple of tensors or a Panel.
_DERIVED_CACHES = ("_cpu_packed_cache", "_cpu_w4a8_cache", "_panel_cache")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ W + b with W stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _check_perm(perm: torch.Tensor, K: int, where: str) -> None:
    """``perm`` must be a permutation of ``0..K-1`` (a file from disk is never trusted)."""
    ok = (perm.dim() == 1 and perm.numel() == K and not perm.is_floating_point()
          and torch.equal(torch.sort(perm.to(torch.int64).cpu()).values, torch.arange(K)))
    if not ok:
        raise ValueError(f"{where}: in_perm must be a permutation of 0..{K - 1} (int, [{K}]), got "
                         f"dtype {perm.dtype}, shape {tuple(perm.shape)}")


def _granularity(group_size: int) -> str:
    return "per-channel" if group_size == -1 else f"group({group_size})"


class QLinear(nn.Module):
    """Quantized linear layer ``y = x @ W.T + b`` with integer ``W``.

    Build one from a float layer with :meth:`from_linear`; the constructor
    creates an empty (zero) layer of the right shapes, e.g. for loading a
    ``state_dict``.
    """

    # W8A8 dynamic and W4A8 layers on AVX-512 VNNI CPUs keep a derived copy of
    # their weight in their kernel's layout (:meth:`_cpu_packed`,
    # :meth:`_cpu_w4a8_packed`): faster at every batch size, the weight bytes
    # once more in memory.
    prepack_cpu_weights = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int = 8,
                 w_group_size: int = -1, w_symmetric: bool = True, act: Optional[str] = "dynamic",
                 act_symmetric: bool = True, ema_alpha: float = 0.9, ema_eps: float = 1e-5,
                 bias_dtype: torch.dtype = torch.float32, w_scale_dtype="float32", in_perm: bool = False,
                 device=None):
        super().__init__()
        scale_dtype = quant_format.scale_dtype_of(w_scale_dtype)
        if w_bits not in quant_format.SUPPORTED_BITS:
            raise ValueError(f"QLinear: unsupported w_bits={w_bits}; supported: 2, 3, 4, 8")
        if act not in ACT_MODES:
            raise ValueError(f"QLinear: act must be one of {ACT_MODES}, got {act!r}")
        K, N = in_features, out_features
        if w_group_size == 0 or w_group_size < -1:
            raise ValueError(f"QLinear: w_group_size must be -1 (per channel) or a positive divisor of "
                             f"in_features={K}, got {w_group_size}")
        if w_group_size > 0 and K % w_group_size:
            divs = [d for d in range(1, K + 1) if K % d == 0]
            raise ValueError(f"QLinear: w_group_size={w_group_size} does not divide in_features={K}; "
                             f"group sizes that divide it: {divs}")
        # The int8 GEMM epilogue folds per-channel symmetric 8-bit weight scales;
        # other weight layouts with quantized activations (ZeroQuant W4A8,
        # group-wise W8A8) run "simulated": activations are quantized and
        # dequantized exactly as the integer path would, then the weight-only
        # kernel does the product (same math, float accumulation, slower).
        self.int8_gemm = act is not None and w_bits == 8 and w_group_size == -1 and w_symmetric
        # 4-bit weights x per-token symmetric int8 activations on CPU tensors:
        # the W4A8 op, where its SIMD kernel takes the layer (decided once
        # here; forward only asks for the CPU). Asymmetric activations would
        # need per-group weight sums: simulated.
        self.w4a8 = act == "dynamic" and act_symmetric and w_bits == 4 and ops.w4a8_fast(K, w_group_size)
        self.in_features, self.out_features = K, N
        self.w_bits, self.w_group_size, self.w_symmetric = w_bits, w_group_size, w_symmetric
        self.act, self.act_symmetric = act, act_symmetric
        self.ema_alpha, self.ema_eps = float(ema_alpha), float(ema_eps)
        self.ema_update = True
        # Packed for real (quant_format.pack_bits): 8-bit int8, 4-bit two per byte,
        # 3-bit 8 values in 3 bytes, 2-bit four per byte, on every device (the ops
        # run what a device's kernels lack in PyTorch: ops.py).
        self.storage_bits = w_bits
        G = 1 if w_group_size == -1 else K // w_group_size
        kq = quant_format.packed_len(K, w_bits)
        qdtype = torch.uint8 if w_bits != 8 else torch.int8
        self.register_buffer("qweight", torch.zeros(N, kq, dtype=qdtype, device=device))
        # float16 scales halve the scale bytes; the kernels take float32, so
        # forward() widens them per call (N x G values: small next to the weights)
        self.register_buffer("w_scale", torch.ones(N, G, dtype=scale_dtype, device=device))
        self.register_buffer("w_zero", None if w_symmetric else torch.zeros(N, G, dtype=torch.int8, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=bias_dtype, device=device) if bias else None)
        # act order: held column j multiplies input column in_perm[j] (identity until set)
        self.register_buffer("in_perm", torch.arange(K, dtype=torch.int64, device=device) if in_perm else None)
        # sum_k W[n,k]: derived from qweight, so not saved (recomputed on load).
        self.register_buffer("w_sum", torch.zeros(N, dtype=torch.int32, device=device), persistent=False)
        if act == "static":
            self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device))
            self.register_buffer("act_zero", torch.zeros(1, dtype=torch.int8, device=device))
        if act == "ema":
            self.register_buffer("ema_state", ops.new_ema_state(device))
            # batches whose range was NaN/Inf: quantized with the state as it
            # was, not observed (one bad batch must not poison the state)
            self.register_buffer("ema_skipped", torch.zeros((), dtype=torch.int64, device=device),
                                 persistent=False)
        self._w_sum_of = None  # (data_ptr, _version) of the qweight that w_sum was computed from
        self._register_load_state_dict_pre_hook(self._check_state_dict)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._after_load())

    # ------------------------------------------------------------------ build
    def spec(self) -> dict:
        """The constructor arguments that rebuild this layer's structure (JSON-safe);
        the tensors come from the state_dict."""
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    w_bits=self.w_bits, w_group_size=self.w_group_size, w_symmetric=self.w_symmetric,
                    act=self.act, act_symmetric=self.act_symmetric, ema_alpha=self.ema_alpha,
                    ema_eps=self.ema_eps, w_scale_dtype=str(self.w_scale.dtype).replace("torch.", ""),
                    bias_dtype=str(self.bias.dtype).replace("torch.", "") if self.bias is not None else "float32",
                    in_perm=self.in_perm is not None)

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "QLinear":
        """An empty layer from :meth:`spec` (load its state_dict next)."""
        kw = dict(spec)
        try:
            bias_dtype = getattr(torch, kw.get("bias_dtype", "float32"), None)
            if not (isinstance(bias_dtype, torch.dtype) and bias_dtype.is_floating_point):
                raise ValueError(f"bias_dtype must name a floating dtype, got {kw.get('bias_dtype')!r}")
            kw["bias_dtype"] = bias_dtype
            return cls(kw.pop("in_features"), kw.pop("out_features"), device=device, **kw)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"QLinear.from_spec: bad layer spec {spec}: {err}") from err

    @classmethod
    def from_linear(cls, module: nn.Module, *, w_bits: int = 8, w_group_size: int = -1,
                    w_symmetric: bool = True, act: Optional[str] = "dynamic", act_symmetric: bool = True,
                    ema_alpha: float = 0.9, ema_eps: float = 1e-5, w_scale_dtype="float32") -> "QLinear":
        """Quantize an ``nn.Linear`` or a transformers ``Conv1D`` (round-to-nearest)."""
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
        elif _is_conv1d(module):
            weight = module.weight.detach().t()
        else:
            raise TypeError(f"QLinear.from_linear: expected nn.Linear or transformers Conv1D, "
                            f"got {type(module).__name__}")
        N, K = weight.shape
        bias = getattr(module, "bias", None)
        q = cls(K, N, bias is not None, w_bits=w_bits, w_group_size=w_group_size, w_symmetric=w_symmetric,
                act=act, act_symmetric=act_symmetric, ema_alpha=ema_alpha, ema_eps=ema_eps,
                bias_dtype=bias.dtype if bias is not None else torch.float32, w_scale_dtype=w_scale_dtype,
                device=weight.device)
        q.set_weight(weight)
        if bias is not None:
            q.bias.copy_(bias.detach())
        return q

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
                   zero_point: Optional[torch.Tensor] = None) -> None:
        """Quantize a float weight ``[out, in]`` into this layer (RTN), or store
        it with given scales/zero-points (what calibrated methods produce)."""
        N, K = self.out_features, self.in_features
        if tuple(weight.shape) != (N, K):
            raise ValueError(f"QLinear.set_weight: expected a weight of shape ({N}, {K}), got {tuple(weight.shape)}")
        # (a meta weight has no values to check: the layer's shapes still build)
        if not weight.is_meta and not torch.isfinite(weight).all():
            raise ValueError("QLinear.set_weight: the weight contains NaN or Inf")
        w = weight.float()
        sdt = self.w_scale.dtype
        if scale is None:  # float16 scales are rounded before the integers are chosen
            qw, s, z = ops.quantize(w, self.w_bits, self.w_symmetric, self.w_group_size, scale_dtype=sdt)
        else:
            z = zero_point if zero_point is not None else torch.zeros_like(scale, dtype=torch.int8)
            scale = quant_format.storable_scale(scale.float(), sdt)
            qw = ops.quantize_static(w, scale.reshape(self.w_scale.shape).contiguous().to(w.device),
                                     z.to(torch.int8).reshape(self.w_scale.shape).contiguous().to(w.device),
                                     self.storage_bits, self.w_group_size)
            s = scale
        self.qweight.copy_(qw)
        self.w_scale.copy_(s.reshape(self.w_scale.shape))
        if self.w_zero is not None:
            self.w_zero.copy_(z.reshape(self.w_zero.shape))
        self._refresh_w_sum()

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None) -> None:
        """Store integer weights a method produced (GPTQ, AWQ, ...): ``q`` int8
        values ``[out, in]`` in ``[-2^(b-1), 2^(b-1)-1]`` for ``b = w_bits``, with
        ``scale`` / ``zero_point`` in this layer's granularity. With float16
        scales, pass scales the method already rounded
        (``quant_format.storable_scale``) so ``q`` was chosen against them."""
        N, K = self.out_features, self.in_features
        if tuple(q.shape) != (N, K):
            raise ValueError(f"QLinear.set_quantized: expected q of shape ({N}, {K}), got {tuple(q.shape)}")
        qmin, qmax = quant_format.qrange(self.w_bits)
        if q.numel() and (q.min() < qmin or q.max() > qmax):
            raise ValueError(f"QLinear.set_quantized: {self.w_bits}-bit values must lie in [{qmin}, {qmax}], "
                             f"got [{int(q.min())}, {int(q.max())}]")
        if scale.numel() != self.w_scale.numel() or not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"QLinear.set_quantized: expected {self.w_scale.numel()} finite positive scales, "
                             f"got shape {tuple(scale.shape)}")
        self.qweight.copy_(quant_format.pack_bits(q.to(torch.int8), self.storage_bits))
        self.w_scale.copy_(quant_format.storable_scale(scale.float(), self.w_scale.dtype).reshape(self.w_scale.shape))
        if self.w_zero is not None:
            zp = zero_point if zero_point is not None else torch.zeros_like(self.w_zero)
            self.w_zero.copy_(zp.reshape(self.w_zero.shape))
        self._refresh_w_sum()

    @torch.no_grad()
    def set_in_perm(self, perm: torch.Tensor) -> None:
        """Set the input permutation of an ``in_perm=True`` layer: held weight
        column ``j`` multiplies input column ``perm[j]`` (set the weight in that
        held order, e.g. with :meth:`set_quantized`)."""
        if self.in_perm is None:
            raise RuntimeError("QLinear.set_in_perm: this layer was built with in_perm=False")
        perm = torch.as_tensor(perm)
        _check_perm(perm, self.in_features, "QLinear.set_in_perm")
        self.in_perm.copy_(perm.to(torch.int64))

    def _refresh_w_sum(self) -> None:
        if self.storage_bits == 8:
            self.w_sum.copy_(ops.weight_row_sums(self.qweight))
        self._w_sum_of = self._qweight_key()

    def _qweight_key(self):
        # Inference tensors (made under torch.inference_mode) have no version
        # counter: for them only a new storage is noticed.
        return _tensor_key(self.qweight)

    def _row_sums(self, q: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``w_sum``, recomputed first if ``qweight`` (``q``: the held qweight,
        passed by forward, which has fetched it already) changed since (an
        in-place edit bumps the tensor's version counter), so it can never go
        stale. Under torch.compile the check is skipped (the traced graph
        cannot read version counters); the layer is set up before compiling."""
        if not torch.compiler.is_compiling():
            if q is None:
                q = self._buffers["qweight"]
            if self._w_sum_of != _tensor_key(q):
                with torch.no_grad():
                    self._refresh_w_sum()
        return self._buffers["w_sum"]

    def _after_load(self) -> None:
        self._refresh_w_sum()
        self.check_values("load_state_dict")

    @torch.no_grad()
    def check_values(self, where: str = "QLinear") -> None:
        """Raise ``ValueError`` unless every held value is one the kernels can
        use: positive finite scales, zero-points in the weight's integer range,
        a finite bias and activation state (a file from disk is never trusted)."""
        def bad(msg):
            raise ValueError(f"{where}: {msg}")

        s = self.w_scale
        if s.numel() and not (torch.isfinite(s).all() and (s > 0).all()):
            bad(f"weight scales must be finite and > 0, got min {s.float().min().item():g}, "
                f"max {s.float().max().item():g}")
        if self.w_zero is not None and self.w_zero.numel():
            qmin, qmax = quant_format.qrange(self.w_bits)
            lo, hi = int(self.w_zero.min()), int(self.w_zero.max())
            if lo < qmin or hi > qmax:
                bad(f"{self.w_bits}-bit zero-points must lie in [{qmin}, {qmax}], got [{lo}, {hi}]")
        if self.bias is not None and not torch.isfinite(self.bias).all():
            bad("the bias holds NaN or Inf")
        if self.in_perm is not None:
            _check_perm(self.in_perm, self.in_features, where)
        if self.act == "static" and not (torch.isfinite(self.act_scale).all() and (self.act_scale > 0).all()):
            bad(f"the static activation scale must be finite and > 0, got {self.act_scale.tolist()}")
        if self.act == "ema":
            st = self.ema_state
            if not torch.isfinite(st).all() or st[0] < 0 or st[3] < 0 or (st[3] > 0 and st[1] > st[2]):
                bad(f"the EMA state [absmax, min, max, steps] is invalid: {st.tolist()}")

    def _apply(self, fn, recurse=True):
        # Module casts (half(), to(dtype)) convert every floating buffer; the
        # scales and activation state keep their dtype and only move device.
        # The bias follows casts to the dtypes the kernels take (float32,
        # float16, bfloat16) and keeps its dtype under any other (double()).
        kept = {k: self._buffers[k] for k in (*_FIXED_DTYPE_BUFFERS, "bias") if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        # derived layouts of the old storage (re-derived on the next call that wants one)
        for cache in _DERIVED_CACHES:
            self.__dict__.pop(cache, None)
        for k, t in kept.items():
            moved = self._buffers[k]
            if moved.dtype != t.dtype and (k != "bias" or moved.dtype not in _BIAS_DTYPES):
                self._buffers[k] = t.to(moved.device)
        return self

    def _check_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        if key in state_dict and state_dict[key].shape != self.qweight.shape:
            raise ValueError(f"QLinear: state_dict '{key}' has shape {tuple(state_dict[key].shape)}, this layer "
                             f"expects {tuple(self.qweight.shape)} ({self.w_bits}-bit, "
                             f"in_features={self.in_features}, out_features={self.out_features})")

    # ------------------------------------------------------------ activations
    @torch.no_grad()
    def set_static_range(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
        """Set the calibrated activation range for ``act="static"``."""
        if self.act != "static":
            raise RuntimeError(f"QLinear.set_static_range: this layer has act={self.act!r}, not 'static'")
        lo_t, hi_t = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        if not (torch.isfinite(lo_t).all() and torch.isfinite(hi_t).all()):
            raise ValueError(f"QLinear.set_static_range: the calibrated range must be finite, got lo={lo}, hi={hi}")
        if (lo_t > hi_t).any():
            raise ValueError(f"QLinear.set_static_range: lo={lo} > hi={hi}")
        if self.act_symmetric:
            s = quant_format.scale_from_absmax(torch.maximum(lo_t.abs(), hi_t.abs()).reshape(1), 8)
            z = torch.zeros(1, dtype=torch.int8)
        else:
            s, z = quant_format.scale_zp_from_minmax(lo_t.reshape(1), hi_t.reshape(1), 8)
        self.act_scale.copy_(s)
        self.act_zero.copy_(z)

    # ---------------------------------------------------------------- forward
    def scales(self) -> torch.Tensor:
        """Weight scales as the kernels take them (float32; no copy when held so)."""
        s = self._buffers["w_scale"]
        return s if s.dtype == torch.float32 else s.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~200 times per token at M = 1, where Python time is
        # most of a call: the buffers come from one dict (nn.Module.__getattr__
        # costs ~0.5 us per buffer) and float32 scales are not converted (the
        # weight-only ops take them [N, G] as held; the int8 GEMMs a free
        # [N] view). The ops still check every argument in C++.
        buf = self._buffers
        perm = buf["in_perm"]
        if perm is not None:
            x = x.index_select(-1, perm)
        qw, bias, act = buf["qweight"], buf["bias"], self.act
        if act is None:
            if x.is_cuda and panel.wanted(x, self.storage_bits) and not torch.compiler.is_compiling():
                p = self._cuda_panel(qw)  # the tensor-core W4A16 layout, derived once (None: not this layer)
                if p is not None:
                    return ops.weight_only_linear_panel(x, p.qpanel, p.gparams, self.out_features,
                                                        self.w_group_size, bias)
            return ops.weight_only_linear(x, qw, self.scales(), buf["w_zero"], self.storage_bits,
                                          self.w_group_size, bias)
        if act == "dynamic" and self.int8_gemm:
            # w_scale as [N] (a free view): the ONNX export's translation of this op broadcasts it per column
            if (x.is_cpu and self.prepack_cpu_weights and not torch.compiler.is_compiling()
                    and ops.int8_prepacked_fast()):
                return ops.dynamic_quant_linear_packed(x, self._cpu_packed(qw), self.scales().view(-1),
                                                       self._row_sums(qw), self.in_features, self.out_features,
                                                       bias, self.act_symmetric)
            return ops.dynamic_quant_linear(x, qw, self.scales().view(-1), self._row_sums(qw), bias,
                                            self.act_symmetric)
        if self.w4a8 and x.is_cpu:
            if (self.prepack_cpu_weights and not torch.compiler.is_compiling()
                    and ops.w4a8_prepacked_fast(self.in_features, self.w_group_size)):
                wp, gp = self._cpu_w4a8_packed(qw)
                return ops.w4a8_linear_packed(x, wp, gp, self.in_features, self.out_features, self.w_group_size,
                                              bias)
            return ops.w4a8_linear(x, qw, self.scales(), buf["w_zero"], self.w_group_size, bias)
        x2 = x.reshape(-1, self.in_features)
        if act == "dynamic":
            qx, scale, zero = ops.quantize(x2, 8, self.act_symmetric, -1)
        elif act == "static":
            qx = ops.quantize_static(x2, self.act_scale, self.act_zero, 8, 0)
            scale, zero = self.act_scale, self.act_zero
        else:
            before = self.ema_state[3].clone() if self.ema_update else None
            qx, scale, zero = ops.ema_quantize_(x2, self.ema_state, self.ema_alpha, self.ema_eps, 8,
                                                self.act_symmetric, self.ema_update)
            if before is not None:
                self._count_ema_skip(ops.ema_skipped(before, self.ema_state))
        if not self.int8_gemm:
            xq = ops.dequantize(qx, scale, zero, 8, -1 if act == "dynamic" else 0, self.in_features, x.dtype)
            out = ops.weight_only_linear(xq, qw, self.scales(), buf["w_zero"], self.storage_bits,
                                         self.w_group_size, bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        out = ops.scaled_int8_gemm(qx, scale, qw, self.scales().view(-1), a_zero=None if self.act_symmetric else zero,
                                   b_sum=self._row_sums(qw), bias=bias, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def bound_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable equal to :meth:`forward` for the layer as it is now, with
        every per-call decision taken once: for a CPU layer on a compiled
        kernel (weight-only, dynamic W8A8, W4A8) the kernel op with its weight
        tensors, scales, row sums and derived layout bound (``ops.kernel``),
        else ``forward`` itself. The same op on the same tensors: the same
        outputs, bit for bit.

        Why: at decode a 135M model makes ~120 QLinear calls per token of
        ~20-60 us each, and ``module(x)`` spends ~15-25 us of Python on top of
        its op (nn.Module.__call__, the branches above, the ops wrapper).

        Valid while the layer's tensors stay as they are (the bound ones are
        not re-checked: rebuild it after ``set_weight``, ``load_state_dict``
        or ``.to()``), and it is ``forward``, not ``__call__``: hooks do not
        run (callers that honour them check for them first, as
        ``eval.fast_decode`` does). The kernel choice (``LLMEQ_CPU_ISA``,
        ``prepack_cpu_weights``) is the one in force now."""
        b = self._buffers
        qw, bias, perm = b["qweight"], b["bias"], b["in_perm"]
        if not qw.is_cpu or torch.compiler.is_compiling():
            return self.forward
        K, N = self.in_features, self.out_features
        if self.act is None and not ops.kernels_lack(self.storage_bits, qw.device):
            op = ops.kernel("weight_only_linear")
            args = (qw, self.scales(), b["w_zero"], self.storage_bits, self.w_group_size, bias)
        elif self.act == "dynamic" and self.int8_gemm:
            if self.prepack_cpu_weights and ops.int8_prepacked_fast():
                op = ops.kernel("dynamic_quant_linear_packed")
                args = (self._cpu_packed(qw), self.scales().view(-1), self._row_sums(qw), K, N, bias,
                        self.act_symmetric)
            else:
                op = ops.kernel("dynamic_quant_linear")
                args = (qw, self.scales().view(-1), self._row_sums(qw), bias, self.act_symmetric)
        elif self.w4a8:
            if self.prepack_cpu_weights and ops.w4a8_prepacked_fast(K, self.w_group_size):
                op = ops.kernel("w4a8_linear_packed")
                args = (*self._cpu_w4a8_packed(qw), K, N, self.w_group_size, bias)
            else:
                op = ops.kernel("w4a8_linear")
                args = (qw, self.scales(), b["w_zero"], self.w_group_size, bias)
        else:  # static / EMA activations, simulated layouts: forward's own path
            return self.forward
        if perm is None:
            return lambda x: op(x, *args)
        return lambda x: op(x.index_select(-1, perm), *args)

    def _count_ema_skip(self, skipped: torch.Tensor) -> None:
        self.ema_skipped += skipped.to(torch.int64)
        # On the CPU the flag is already on the host: warn now. On a GPU that
        # would synchronise every call; read ema_skipped instead.
        if skipped.device.type == "cpu" and not torch.compiler.is_compiling() and bool(skipped):
            import warnings

            warnings.warn(f"QLinear(act='ema'): an activation batch held NaN or Inf; it was quantized with the "
                          f"current EMA state and not observed ({int(self.ema_skipped)} batch(es) skipped so far)",
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ misc
    def _cpu_packed(self, qw: torch.Tensor) -> torch.Tensor:
        """This W8A8 layer's weight in the CPU panel layout
        (:mod:`llmeasyquant.cpu_pack`), derived on the first call that wants
        it and again whenever qweight changes (data pointer and version
        counter are the key, as for :meth:`_cuda_panel`). A plain attribute:
        never in state_dict, never saved; one more byte per weight in memory
        (set ``prepack_cpu_weights = False`` on a layer or the class to trade
        that for the row-major kernel's speed)."""
        key = _tensor_key(qw)
        cache = self.__dict__.get("_cpu_packed_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, cpu_pack.pack_int8_panels(qw))
            self.__dict__["_cpu_packed_cache"] = cache
        return cache[1]

    def _cpu_w4a8_packed(self, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This W4A8 layer's weight, scales and zero-points in the CPU's
        pre-packed W4A8 layout (:func:`llmeasyquant.cpu_pack.pack_w4a8`),
        derived and re-derived like :meth:`_cpu_packed` (qweight, the scales
        and the zero-points are the key); never saved. It holds the 4-bit
        weights a second time (0.5 byte per weight) plus the group parameters."""
        b = self._buffers
        key = tuple(None if t is None else _tensor_key(t) for t in (qw, b["w_scale"], b["w_zero"]))
        cache = self.__dict__.get("_cpu_w4a8_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, cpu_pack.pack_w4a8(qw, self.scales(), b["w_zero"], self.in_features))
            self.__dict__["_cpu_w4a8_cache"] = cache
        return cache[1]

    def _cuda_panel(self, qw: torch.Tensor):
        """This 4-bit layer in the CUDA panel layout (:mod:`llmeasyquant.panel`),
        or None when the panel kernel cannot take it. Derived on the first call
        that wants it and again whenever qweight, the scales or the zero-points
        change (their data pointers and version counters are the key: .to(),
        load_state_dict and in-place edits all invalidate it). A plain
        attribute, not a buffer: never in state_dict, never saved. It holds a
        second copy of the 4-bit weights on the GPU (0.5 byte per weight)."""
        b = self._buffers
        parts = (qw, b["w_scale"], b["w_zero"])
        key = tuple(None if t is None else _tensor_key(t) for t in parts)
        cache = self.__dict__.get("_panel_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, panel.pack(qw, self.scales(), b["w_zero"], self.w_group_size, self.in_features))
            self.__dict__["_panel_cache"] = cache
        return cache[1]

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this layer actually multiplies with."""
        zero = self.w_zero if self.w_zero is not None else torch.zeros_like(self.w_scale, dtype=torch.int8)
        held = ops.dequantize(self.qweight, self.scales(), zero, self.storage_bits, self.w_group_size,
                              self.in_features, dtype)
        if self.in_perm is None:
            return held
        w = torch.empty_like(held)
        w[:, self.in_perm] = held  # back to the input's column order
        return w

    def memory_bytes(self) -> int:
        """Bytes held by the saved tensors (packed weights, scales, zero-points, bias, act. state)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def derived_bytes(self) -> int:
        """Bytes of the kernel layouts derived from the weights and held now
        (the CPU pre-packed copy, the CUDA panel): not saved, not in
        :meth:`memory_bytes`."""
        n = 0
        for name in _DERIVED_CACHES:
            cache = self.__dict__.get(name)
            value = None if cache is None else cache[1]
            if value is None:
                continue
            parts = (value.qpanel, value.gparams) if isinstance(value, panel.Panel) else (
                value if isinstance(value, tuple) else (value,))
            n += sum(t.numel() * t.element_size() for t in parts)
        return n

    def extra_repr(self) -> str:
        w = (f"w={self.w_bits}-bit {_granularity(self.w_group_size)} "
             f"{'symmetric' if self.w_symmetric else 'asymmetric'}")
        if self.w_scale.dtype != torch.float32:
            w += " fp16 scales"
        if self.in_perm is not None:
            w += " act-order (input permuted)"
        if self.act is None:
            a = "act=none (weight-only)"
        else:
            kind = {"dynamic": "dynamic per-token", "static": "static per-tensor",
                    "ema": f"EMA per-tensor (alpha={self.ema_alpha})"}[self.act]
            a = f"act=8-bit {kind} {'symmetric' if self.act_symmetric else 'asymmetric'}"
            if self.int8_gemm and self.act == "dynamic" and self.prepack_cpu_weights and ops.int8_prepacked_fast():
                a += " (int8 kernel on pre-packed weights on this CPU)"
            elif self.w4a8:
                packed = self.prepack_cpu_weights and ops.w4a8_prepacked_fast(self.in_features, self.w_group_size)
                a += (" (W4A8 int8 kernel on pre-packed weights on this CPU" if packed else
                      " (W4A8 int8 kernel on the CPU") + "; simulated on other devices)"
            elif not self.int8_gemm:
                a += " (simulated: no int8 kernel for this weight layout yet)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {w}, {a}")
