"""A lean forward for LLaMA-form decoder models (LLaMA, Mistral, Qwen2,
Qwen3, SmolLM): the same modules, none of Hugging Face's per-call plumbing.

Why: at decode (one token per sequence) a 135M-parameter model spends most of
a token outside its matrix products, in HF's module calls, keyword plumbing,
mask and cache objects and in dozens of tiny ops per layer
(docs/benchmarks.md, "Decode overhead"). This runs the decoder stack as one
plain loop over the model's own submodules:

* every projection (``q/k/v/o_proj``, ``gate/up/down_proj``, ``lm_head``)
  runs what its module runs — ``nn.Linear``, ``QLinear``, with its forward
  hooks (the online Hadamard of a rotated model is one) — so whatever a method
  put there runs unchanged; a layer without hooks is called through its
  forward with the arguments bound once (``QLinear.bound_forward``, the
  kernel op itself; ``F.linear`` for ``nn.Linear``): the same op on the same
  tensors, ~15-25 us of Python less per call. The one exception: where
  :mod:`llmeasyquant.nn.concat` can join ``q/k/v_proj`` (and ``gate/up_proj``)
  into one QLinear with bit-for-bit the same outputs, one call replaces
  three (two), on a copy of their integer weights held for this decoder's
  life (``join=False`` calls them one by one; float layers never join, so a
  float model runs HF's own calls);
* the glue around them is the same arithmetic HF's LLaMA code does, in the
  same order (RMSNorm as ``x * rsqrt(mean(x^2) + eps) * w``, rotate-half
  RoPE, scaled-dot-product attention), with the cos/sin table computed once
  by the model's own rotary module and K/V written into one buffer per layer
  allocated for the whole generation (no concatenation per token).

* on the CPU the glue runs fused by default (``fused=None``: on for CPU
  models): each residual add and the RMSNorm after it, SiLU(gate) * up, and
  one decode position's RoPE + KV-cache write + attention are one op each
  (``ops.add_rms_norm`` / ``silu_mul`` / ``decode_attention_``, C++ kernels,
  kernels/decode_glue.cpp) instead of ~30 small ATen ops per block. Same
  arithmetic in float32, other summation orders: within float rounding of
  the plain loop (fp32 logits of the default model within 3e-5 over 6
  steps), not bit-equal. ``fused=False`` keeps HF's ops, op for op.

What it refuses (:func:`unsupported` says why; callers fall back to
:func:`llmeasyquant.eval.speed.greedy_decode`): any model type outside
:data:`DECODE_FORMS`, a block that lacks one of the modules named there, a
quantized KV cache (SimQuant's cache object), sliding-window attention
shorter than the generation, RoPE types whose frequencies depend on the
sequence length (``dynamic``, ``longrope``), an activation other than SiLU,
and padded batches (every prompt row the same length, as in
:func:`~llmeasyquant.eval.speed.greedy_decode`).

Exactness (``fused=False``): the same ops on the same shapes as HF's forward with its cache
(the one difference: attention reads a view of the preallocated buffer, not
a concatenated tensor), so the logits come out as HF's — bit for bit where
measured (tiny LLaMA, float and SmoothQuant W8A8, AVX2, 2026-12-02) — and so
do the greedy tokens, which per-token activation quantization would not
forgive otherwise; ``tests/test_fast_decode.py`` checks logits and tokens
on tiny LLaMA / Mistral / Qwen2 / Qwen3 models, float, quantized and
rotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..nn import concat
from ..nn.qlinear import QLinear

#: model types whose decoder blocks have LLaMA's form; the value names the
#: per-head norms the attention applies to q and k before RoPE (Qwen3)
DECODE_FORMS = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}

_BLOCK_MODULES = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def _sliding_window(model, attn) -> Optional[int]:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    # Mistral's attention reads the config's window directly
    return getattr(model.config, "sliding_window", None)


def unsupported(model, total_tokens: Optional[int] = None) -> Optional[str]:
    """Why :class:`FastDecoder` cannot run ``model`` (None when it can).
    ``total_tokens``: prompt + generated tokens, for the sliding-window check."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in DECODE_FORMS:
        return f"model type {mtype!r} is not one of the LLaMA-form types {sorted(DECODE_FORMS)}"
    if getattr(model, "llmeq_kv_config", None) is not None:
        return "it carries a quantized KV cache (SimQuant), which the fast decoder does not implement"
    layers = _get(model, "model.layers")
    if layers is None or _get(model, "model.embed_tokens") is None or _get(model, "model.norm") is None \
            or _get(model, "model.rotary_emb") is None or getattr(model, "lm_head", None) is None:
        return "it lacks model.layers / embed_tokens / norm / rotary_emb or lm_head"
    rope = _rope_type(cfg)
    if rope in ("dynamic", "longrope"):
        return f"its RoPE type {rope!r} changes frequencies with the sequence length"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"its MLP activation is {cfg.hidden_act!r}, not silu"
    qk_norm = DECODE_FORMS[mtype]
    for i, layer in enumerate(layers):
        missing = [p for p in _BLOCK_MODULES if _get(layer, p) is None]
        if qk_norm:
            missing += [p for p in ("self_attn.q_norm", "self_attn.k_norm") if _get(layer, p) is None]
        if missing:
            return f"block {i} lacks {', '.join(missing)}"
        for norm in ("input_layernorm", "post_attention_layernorm") + (
                ("self_attn.q_norm", "self_attn.k_norm") if qk_norm else ()):
            m = _get(layer, norm)
            if getattr(m, "weight", None) is None or not hasattr(m, "variance_epsilon"):
                return f"block {i}'s {norm} is not an RMSNorm with weight and variance_epsilon"
        window = _sliding_window(model, layer.self_attn)
        if window is not None and (total_tokens is None or window < total_tokens):
            return f"block {i} attends through a sliding window of {window} tokens"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm's arithmetic, op for op (float32 inside, cast back)
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if dtype == torch.float32 else h.to(dtype))


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # HF: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). Here the
    # halves are swapped by one flip and the minus sits in the table
    # (signed_sin = cat(-sin1, sin2)): (-x2) * s == x2 * (-s) exactly, so the
    # result is HF's bit for bit in 3 ops fewer (~20 us less per call at
    # head_dim 64 on one CPU thread).
    return x * cos + x.unflatten(-1, (2, -1)).flip(-2).flatten(-2) * signed_sin


def _direct(module: torch.nn.Module) -> Callable:
    """``module``'s call without its per-call Python plumbing where that
    changes nothing: a QLinear's :meth:`~llmeasyquant.nn.qlinear.QLinear.bound_forward`
    (its kernel op with the arguments bound), an ``nn.Linear``'s ``F.linear``
    on its own weight and bias (what its forward does); the module itself
    when it has hooks to run (an online rotation) or is anything else. Bound
    for this decoder's life, as the joined layers are."""
    if concat.hooked(module) or concat.global_hooks():
        return module
    if type(module) is QLinear:
        return module.bound_forward()
    if type(module) is torch.nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _side_by_side(parts, join: bool) -> tuple[Callable, Optional[Callable]]:
    """``(call, joined)``: ``call(h)`` returns each part's output, through one
    joined QLinear where :func:`llmeasyquant.nn.concat.refusal` allows it (bit
    for bit the same outputs; ``joined`` calls that layer), else each part
    called as itself (``joined`` None)."""
    if join and concat.refusal(parts) is None:
        joined, sizes = _direct(concat.concat(parts)), [m.out_features for m in parts]
        return (lambda h: joined(h).split(sizes, -1)), joined
    calls = [_direct(m) for m in parts]
    return (lambda h: [c(h) for c in calls]), None


@dataclass
class _Block:
    ln1_w: torch.Tensor
    ln1_eps: float
    qkv: Callable
    qkv_joined: Optional[Callable]  # q/k/v as one layer (the q/k RoPE reads its output whole)
    o: Callable
    q_norm: Optional[tuple]
    k_norm: Optional[tuple]
    ln2_w: torch.Tensor
    ln2_eps: float
    gate_up: Callable
    down: Callable
    scaling: float


class FastDecoder:
    """One generation's state for ``model``: K/V buffers for ``batch`` rows of
    up to ``max_tokens`` positions and the RoPE table for those positions.
    :meth:`forward` takes the next tokens of every row and returns the float32
    logits of their last position."""

    def __init__(self, model, batch: int, max_tokens: int, join: bool = True, fused: Optional[bool] = None):
        why = unsupported(model, max_tokens)
        if why is not None:
            raise ValueError(f"FastDecoder: {why}")
        if batch < 1 or max_tokens < 1:
            raise ValueError(f"FastDecoder: batch and max_tokens must be >= 1, got {batch}, {max_tokens}")
        cfg = model.config
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = _direct(model.lm_head)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.max_tokens = max_tokens
        self.batch = batch
        self.pos = 0
        param = self.embed.weight
        device, dtype = param.device, param.dtype
        qk_norm = DECODE_FORMS[cfg.model_type]
        self.blocks = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv, qkv_joined = _side_by_side((a.q_proj, a.k_proj, a.v_proj), join)
            self.blocks.append(_Block(
                ln1_w=layer.input_layernorm.weight, ln1_eps=layer.input_layernorm.variance_epsilon,
                qkv=qkv, qkv_joined=qkv_joined, o=_direct(a.o_proj),
                q_norm=(a.q_norm.weight, a.q_norm.variance_epsilon) if qk_norm else None,
                k_norm=(a.k_norm.weight, a.k_norm.variance_epsilon) if qk_norm else None,
                ln2_w=layer.post_attention_layernorm.weight,
                ln2_eps=layer.post_attention_layernorm.variance_epsilon,
                gate_up=_side_by_side((m.gate_proj, m.up_proj), join)[0], down=_direct(m.down_proj),
                scaling=float(getattr(a, "scaling", self.head_dim ** -0.5))))
        shape = (batch, self.kv_heads, max_tokens, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        with torch.no_grad():
            positions = torch.arange(max_tokens, device=device).unsqueeze(0)
            probe = torch.zeros(1, 1, device=device, dtype=dtype)
            cos, sin = inner.rotary_emb(probe, position_ids=positions)
        half = self.head_dim // 2
        self.cos = cos[0]  # [max_tokens, head_dim]
        self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        # The fused glue (module docstring): CPU kernels; elsewhere the ops
        # run HF's arithmetic op by op, so the plain loop is as good there.
        self.fused = device.type == "cpu" if fused is None else bool(fused)
        if self.fused:
            with torch.no_grad():
                cos32, sin32 = inner.rotary_emb(probe.float(), position_ids=positions)
            self.cos32, self.sin32 = cos32[0].float().contiguous(), sin32[0].float().contiguous()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` [batch, T]: the next T tokens of every row (T > 1 only for the
        first call: the prompt). Returns float32 logits [batch, vocab] of the
        last position and advances the position by T."""
        B, T = ids.shape
        if B != self.batch:
            raise ValueError(f"FastDecoder.forward: expected {self.batch} rows, got {B}")
        p0, p1 = self.pos, self.pos + T
        if p1 > self.max_tokens:
            raise ValueError(f"FastDecoder.forward: {p1} positions exceed max_tokens={self.max_tokens}")
        if T > 1 and p0 > 0:
            raise ValueError("FastDecoder.forward: several tokens at once only as the first call (the prompt)")
        if self.fused:
            logits = self._forward_fused(ids, p0, p1)
            self.pos = p1
            return logits
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[p0:p1], self.signed_sin[p0:p1]  # broadcast over [B, heads, T, D]
        gqa = H != Hkv
        x = self.embed(ids)
        for blk, kc, vc in zip(self.blocks, self.k_cache, self.v_cache):
            h = _rms_norm(x, blk.ln1_w, blk.ln1_eps)
            if blk.qkv_joined is not None and blk.q_norm is None:
                # q and k side by side in the joined output: one RoPE over
                # both heads' sets (element-wise ops: the same values as two)
                qkv = blk.qkv_joined(h)
                qk = _rope(qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D).transpose(1, 2), cos, sin)
                q = qk[:, :H]
                kc[:, :, p0:p1] = qk[:, H:]
                v = qkv[..., (H + Hkv) * D:]
            else:
                q, k, v = blk.qkv(h)
                q = q.view(B, T, H, D)
                k = k.view(B, T, Hkv, D)
                if blk.q_norm is not None:
                    q = _rms_norm(q, *blk.q_norm)
                    k = _rms_norm(k, *blk.k_norm)
                q = _rope(q.transpose(1, 2), cos, sin)
                kc[:, :, p0:p1] = _rope(k.transpose(1, 2), cos, sin)
            vc[:, :, p0:p1] = v.view(B, T, Hkv, D).transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, kc[:, :, :p1], vc[:, :, :p1], is_causal=T > 1,
                                                  scale=blk.scaling, enable_gqa=gqa)
            x = x + blk.o(attn.transpose(1, 2).reshape(B, T, H * D))
            h = _rms_norm(x, blk.ln2_w, blk.ln2_eps)
            gate, up = blk.gate_up(h)
            x = x + blk.down(F.silu(gate) * up)
        self.pos = p1
        h = _rms_norm(x[:, -1:], *self.final_norm)
        return self.lm_head(h)[:, -1].to(torch.float32)

    def _forward_fused(self, ids: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
        # The same dataflow as forward with the glue in single ops: each
        # residual add rides in the next RMSNorm (``delta`` is the sublayer
        # output still to be added to x), and one decode position's RoPE, KV
        # write and attention are one call. The prompt (T > 1) keeps RoPE +
        # SDPA (its glue is amortised over T tokens).
        B, T = ids.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        gqa = H != Hkv
        x, delta = self.embed(ids), None
        for blk, kc, vc in zip(self.blocks, self.k_cache, self.v_cache):
            h, x = ops.add_rms_norm(x, blk.ln1_w, blk.ln1_eps, delta)
            q, k, v = blk.qkv(h)  # joined or not: views of one output are what the ops take
            if blk.q_norm is not None:
                q = ops.add_rms_norm(q.unflatten(-1, (H, D)), *blk.q_norm)[0].flatten(-2)
                k = ops.add_rms_norm(k.unflatten(-1, (Hkv, D)), *blk.k_norm)[0].flatten(-2)
            if T == 1:
                attn = ops.decode_attention_(q[:, 0], k[:, 0], v[:, 0], kc, vc, self.cos32[p0], self.sin32[p0],
                                             p0, blk.scaling).unsqueeze(1)
            else:
                cos, sin = self.cos[p0:p1], self.signed_sin[p0:p1]
                q = _rope(q.reshape(B, T, H, D).transpose(1, 2), cos, sin)
                kc[:, :, p0:p1] = _rope(k.reshape(B, T, Hkv, D).transpose(1, 2), cos, sin)
                vc[:, :, p0:p1] = v.reshape(B, T, Hkv, D).transpose(1, 2)
                attn = F.scaled_dot_product_attention(q, kc[:, :, :p1], vc[:, :, :p1], is_causal=True,
                                                      scale=blk.scaling, enable_gqa=gqa)
                attn = attn.transpose(1, 2).reshape(B, T, H * D)
            h, x = ops.add_rms_norm(x, blk.ln2_w, blk.ln2_eps, blk.o(attn))
            gate, up = blk.gate_up(h)
            delta = blk.down(ops.silu_mul(gate, up))
        h = ops.add_rms_norm(x[:, -1:], *self.final_norm, delta[:, -1:])[0]
        return self.lm_head(h)[:, -1].to(torch.float32)


def eos_ids(model) -> list:
    """The EOS ids greedy ``generate`` masks under ``min_new_tokens``."""
    gen = getattr(model, "generation_config", None)
    eos = gen.eos_token_id if gen is not None else None
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, fused: Optional[bool] = None) -> torch.Tensor:
    """``[batch, prompt + new_tokens]``: what greedy ``generate`` (and
    :func:`llmeasyquant.eval.speed.greedy_decode`) returns with
    ``min_new_tokens=new_tokens`` (EOS masked, first maximum), through
    :class:`FastDecoder`. Does not check the generation config: callers that
    must honour one (a repetition penalty, ...) check
    :func:`llmeasyquant.eval.speed.lean_decode_unsupported` first."""
    if new_tokens < 1:
        raise ValueError(f"fast_decode.greedy: new_tokens must be >= 1, got {new_tokens}")
    eos = eos_ids(model)
    B, L = prompt.shape
    dec = FastDecoder(model, B, L + new_tokens, fused=fused)
    logits = dec.forward(prompt)
    toks = [prompt]
    for i in range(new_tokens):
        if eos:
            logits[:, eos] = -float("inf")
        nxt = logits.argmax(-1, keepdim=True)
        toks.append(nxt)
        if i + 1 < new_tokens:
            logits = dec.forward(nxt)
    return torch.cat(toks, dim=1)
