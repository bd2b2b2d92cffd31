"""Method configs and the registry that maps a method name to its code.

Every method is one module with one function ``apply(model, spec, config,
calib) -> None`` that replaces the model's linears (in place) by QLinear.
Configs are small dataclasses that round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar, Optional


@dataclass
class QuantConfig:
    """Round-to-nearest weights (+ optional activation quantization).

    ``w_group_size``: -1 per output channel, g > 0 group-wise along K.
    ``act``: None (weight-only), "dynamic" (per-token), "static" (calibrated
    per-tensor), "ema" (online per-tensor).
    """

    method: ClassVar[str] = "absmax"
    w_bits: int = 8
    w_group_size: int = -1
    w_symmetric: bool = True
    act: Optional[str] = None
    act_symmetric: bool = True
    exclude: tuple[str, ...] = ("lm_head",)
    n_calib: int = 32  # calibration windows (methods that calibrate)
    calib_seq_len: int = 512
    # weight scales held as "float32" or "float16" (0.25 bits per weight less
    # at group 64; GPTQ/AWQ checkpoints elsewhere use float16)
    w_scale_dtype: str = "float32"

    def __post_init__(self):
        from .._reference import SCALE_DTYPES

        if self.w_scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"{self.method}: w_scale_dtype must be one of {', '.join(SCALE_DTYPES)}, "
                             f"got {self.w_scale_dtype!r}")

    def qlinear_kwargs(self) -> dict:
        return dict(w_bits=self.w_bits, w_group_size=self.w_group_size, w_symmetric=self.w_symmetric,
                    act=self.act, act_symmetric=self.act_symmetric, w_scale_dtype=self.w_scale_dtype)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        return {"method": self.method, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def describe(self) -> str:
        w = f"W{self.w_bits}" + ("" if self.w_group_size == -1 else f" g{self.w_group_size}")
        w += "" if self.w_symmetric else " asym"
        w += "" if self.w_scale_dtype == "float32" else " fp16-scales"
        a = "A16" if self.act is None else f"A8 {self.act}"
        return f"{self.method} {w} {a}"


@dataclass
class AbsMaxConfig(QuantConfig):
    method: ClassVar[str] = "absmax"


@dataclass
class ZeroPointConfig(QuantConfig):
    method: ClassVar[str] = "zeropoint"
    w_symmetric: bool = False
    act_symmetric: bool = False


@dataclass
class ZeroQuantConfig(QuantConfig):
    """Group-wise weights + per-token dynamic activations (W8A8 / W4A8)."""

    method: ClassVar[str] = "zeroquant"
    w_group_size: int = 64
    act: Optional[str] = "dynamic"


@dataclass
class SmoothQuantConfig(QuantConfig):
    """Migrate activation outliers into the weights with per-channel scales
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the previous op."""

    method: ClassVar[str] = "smoothquant"
    act: Optional[str] = "dynamic"
    # asymmetric per-token activations cost nothing extra in the int8 GEMM
    # (its epilogue always applies a zero-point correction) and halved the
    # W8A8 perplexity increase on SmolLM2-135M (docs/results.md)
    act_symmetric: bool = False
    alpha: float = 0.5
    # alpha searched per scale group on calibration tokens (output error of the
    # quantized group); empty: use `alpha` everywhere
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class GPTQConfig(QuantConfig):
    method: ClassVar[str] = "gptq"
    w_bits: int = 4
    w_group_size: int = 64
    w_symmetric: bool = False
    block_size: int = 128
    damp: float = 0.01
    # columns in order of decreasing Hessian diagonal (static groups: no run-time
    # cost); on SmolLM2-135M W4 g64 it cut GPTQ's perplexity increase from +26 %
    # to +17 % (RTN: +34 %), 4 windows x 1024 tokens
    act_order: bool = True
    n_calib: int = 32


@dataclass
class AWQConfig(QuantConfig):
    method: ClassVar[str] = "awq"
    w_bits: int = 4
    w_group_size: int = 64
    w_symmetric: bool = False
    grid: int = 20
    clip: bool = True
    n_calib: int = 32


@dataclass
class SimQuantConfig(QuantConfig):
    """KV-cache quantization; the weights stay float (the inherited ``w_*``/``act``
    fields are unused).

    Keys are quantized per channel over chunks of ``chunk_size`` tokens (before
    RoPE when ``pre_rope`` and the model has an invertible rotary embedding),
    values per token over head_dim (or groups of ``v_group_size`` channels), both
    asymmetric unless ``*_symmetric``; ``outlier_fraction`` of each (batch, head)
    chunk slice, the largest magnitudes, is kept exactly (dense-and-sparse). The
    most recent ``residual_length`` tokens and the first ``sink_tokens`` stay in
    full precision. ``residual_length=0`` (and ``sink_tokens=0``): attention sees
    every K/V quantized, the setting for perplexity measurements.
    """

    method: ClassVar[str] = "simquant"
    k_bits: int = 4
    v_bits: int = 4
    k_symmetric: bool = False
    v_symmetric: bool = False
    chunk_size: int = 64
    v_group_size: int = -1
    outlier_fraction: float = 0.0
    residual_length: int = 32
    sink_tokens: int = 0
    pre_rope: bool = True

    def describe(self) -> str:
        s = f"simquant KV K{self.k_bits} V{self.v_bits} chunk{self.chunk_size} res{self.residual_length}"
        if self.v_group_size != -1:
            s += f" vg{self.v_group_size}"
        if self.outlier_fraction:
            s += f" outliers {100 * self.outlier_fraction:g}%"
        if self.sink_tokens:
            s += f" sink{self.sink_tokens}"
        s += "" if self.pre_rope else " post-rope"
        return s


@dataclass
class MixedConfig(QuantConfig):
    """Per-layer bit widths (``bitmap``: layer path -> 2, 3, 4 or 8), e.g. from
    :func:`llmeasyquant.search.search`. 8-bit layers per channel symmetric,
    lower widths group-wise (``w_group_size``) asymmetric; ``base``: ``rtn`` or
    ``gptq`` (each layer with its own input Hessian from the float model).
    Layers not in the map stay float."""

    method: ClassVar[str] = "mixed"
    bitmap: dict = field(default_factory=dict)
    base: str = "rtn"
    w_group_size: int = 64
    w_symmetric: bool = False
    n_calib: int = 16  # as llmeasyquant.search draws the candidates' calibration windows
    w_scale_dtype: str = "float16"  # as the search's candidates (size is what it optimises)

    def describe(self) -> str:
        counts: dict = {}
        for b in self.bitmap.values():
            counts[b] = counts.get(b, 0) + 1
        mix = ", ".join(f"{n}xW{b}" for b, n in sorted(counts.items()))
        return f"mixed ({mix}) {self.base} g{self.w_group_size} {self.w_scale_dtype} scales"


_CONFIGS: dict[str, type[QuantConfig]] = {
    c.method: c for c in (AbsMaxConfig, ZeroPointConfig, ZeroQuantConfig, SmoothQuantConfig, GPTQConfig, AWQConfig,
                          SimQuantConfig, MixedConfig)
}


def config_for(method: str, **overrides) -> QuantConfig:
    """The config dataclass of ``method`` with ``overrides`` applied."""
    cls = _CONFIGS.get(method)
    if cls is None:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(_CONFIGS))}")
    names = {f.name for f in dataclasses.fields(cls)}
    bad = set(overrides) - names
    if bad:
        raise ValueError(f"{method}: unknown option(s) {sorted(bad)}; options: {sorted(names)}")
    if "exclude" in overrides:
        overrides["exclude"] = tuple(overrides["exclude"])
    if "alpha_grid" in overrides:
        overrides["alpha_grid"] = tuple(overrides["alpha_grid"])
    return cls(**overrides)


def config_from_json(text: str) -> QuantConfig:
    d = json.loads(text)
    method = d.pop("method", None)
    if method is None:
        raise ValueError("quantization config JSON has no 'method'")
    return config_for(method, **d)


def available_methods() -> list[str]:
    return sorted(_CONFIGS)

