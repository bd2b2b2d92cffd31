"""The method registry, and the config base class every method extends.

A method is one module (or one folder, when it has more than one file) under
``llmeasyquant.methods`` that declares, next to its own code:

* a config dataclass (a :class:`QuantConfig` subclass with a ``method`` name;
  configs round-trip through JSON), and
* ``@register_method(ConfigClass, calibrates=...)`` on its
  ``apply(model, spec, config, calib, *, progress, shard, device)`` function,
  which replaces the model's linears (in place) by QLinear.

``calibrates`` says whether the method needs calibration batches (a bool, or
a function of the config). Nothing else in the package lists methods: the
API, the CLI and the save format look them up here. A method defined outside
the package (a user's module, a test) registers the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Union

from ..models.rotate import check_kind as check_rotation
from ..quant_format import SCALE_DTYPES


LM_HEAD_MODES = (None, "w8")


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
    # a pre-transform before the method: "hadamard" rotates the residual stream
    # (models/rotate.py; random signs from rotate_seed) and, with
    # rotate_online, down_proj's input at run time
    rotate: Optional[str] = None
    rotate_seed: int = 0
    rotate_online: bool = True
    # the output head after the method: None keeps what exclude says (float by
    # default); "w8" quantizes it to 8-bit symmetric weights in groups of 64
    # inputs (per channel where 64 does not divide them), float activations
    # (RTN, W8A16; llama.cpp's Q8_0 files hold the output matrix in 8 bits
    # too): on the 135M default model decode ~1.5-1.8x faster at W8A8, perplexity
    # within noise of the float head (docs/results.md). Opt-in: no method's
    # default changes.
    lm_head: Optional[str] = None

    def __post_init__(self):
        if self.w_scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"{self.method}: w_scale_dtype must be one of {', '.join(SCALE_DTYPES)}, "
                             f"got {self.w_scale_dtype!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"{self.method}: lm_head must be one of {LM_HEAD_MODES}, got {self.lm_head!r}")
        if self.lm_head is not None and "lm_head" not in self.exclude:
            raise ValueError(f"{self.method}: lm_head={self.lm_head!r} quantizes the head after the method, which "
                             f"must leave it float: keep 'lm_head' in exclude (got exclude={list(self.exclude)})")
        check_rotation(self.rotate, self.method)

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
        r = "" if self.rotate is None else f" +{self.rotate}" + ("" if self.rotate_online else " (no online)")
        h = "" if self.lm_head is None else f", lm_head {self.lm_head.upper()}A16"
        return f"{self.method}{r} {w} {a}{h}"


@dataclass(frozen=True)
class Method:
    """A registered method: its config class, its code, what it needs."""

    name: str
    config: type[QuantConfig]
    apply: Callable
    calibrates: Union[bool, Callable[[QuantConfig], bool]]
    module: str  # where it is defined (for messages)

    def needs_calibration(self, config: QuantConfig) -> bool:
        return bool(self.calibrates(config) if callable(self.calibrates) else self.calibrates)


_REGISTRY: dict[str, Method] = {}


def register_method(config: type[QuantConfig], *, calibrates: Union[bool, Callable[[QuantConfig], bool]] = False,
                    replace: bool = False):
    """Decorator: register ``apply`` as the code of ``config.method``.

    A second registration of a name raises unless ``replace=True`` (a
    re-imported module, or a test overriding a method on purpose)."""
    if not (isinstance(config, type) and issubclass(config, QuantConfig)):
        raise TypeError(f"register_method: expected a QuantConfig subclass, got {config!r}")
    name = config.method
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_method: {config.__name__}.method must be an identifier, got {name!r}")

    def decorate(apply: Callable) -> Callable:
        old = _REGISTRY.get(name)
        if old is not None and not replace and (old.module, old.apply.__qualname__) != (
                apply.__module__, apply.__qualname__):
            raise ValueError(f"method {name!r} is already registered by {old.module}; pass replace=True to override")
        _REGISTRY[name] = Method(name, config, apply, calibrates, apply.__module__)
        return apply

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method (tests that register their own)."""
    _REGISTRY.pop(name, None)


def method_for(name: str) -> Method:
    m = _REGISTRY.get(name)
    if m is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return m


def config_for(method: str, **overrides) -> QuantConfig:
    """The config dataclass of ``method`` with ``overrides`` applied."""
    cls = method_for(method).config
    names = {f.name for f in dataclasses.fields(cls)}
    bad = set(overrides) - names
    if bad:
        raise ValueError(f"{method}: unknown option(s) {sorted(bad)}; options: {sorted(names)}")
    # JSON gives lists where the configs hold tuples (hashable, immutable)
    for f in dataclasses.fields(cls):
        if f.name in overrides and isinstance(overrides[f.name], list) and "tuple" in str(f.type):
            overrides[f.name] = tuple(overrides[f.name])
    return cls(**overrides)


def config_from_json(text: str) -> QuantConfig:
    d = json.loads(text)
    method = d.pop("method", None)
    if method is None:
        raise ValueError("quantization config JSON has no 'method'")
    return config_for(method, **d)


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
