"""What llmeasyquant knows about each architecture, as typed data: the one
place that names a model type's modules.

Every consumer reads from here: extraction (blocks, linears, scale groups),
the methods (through the groups), SimQuant (KV facts), tensor parallelism
(TP layout) and the plots (representative layer). A model type absent from
:data:`ARCHITECTURES` goes through the generic fallback
(:mod:`llmeasyquant.models.discover`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the op that produces that input.

    ``prev`` is a path (relative to the block) of a norm (``prev_kind="norm"``,
    its weight/bias are divided by the scales) or of a linear
    (``prev_kind="linear"``, its output rows are divided by the scales).

    ``weight_offset`` (norms): the norm computes ``normalize(x) * (weight_offset
    + weight) (+ bias)``; Gemma's RMSNorm stores ``w`` and applies ``1 + w``.
    ``prev_part`` (linears): ``(index, count)``: the linears read only part
    ``index`` of ``count`` equal contiguous parts of ``prev``'s output rows (a
    fused projection: Phi-3's ``gate_up_proj`` feeds ``down_proj`` its up half).
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    weight_offset: float = 0.0
    prev_part: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.prev_kind not in ("norm", "linear"):
            raise ValueError(f"ScaleGroup.prev_kind: expected 'norm' or 'linear', got {self.prev_kind!r}")
        if self.prev_kind != "norm" and self.weight_offset:
            raise ValueError(f"ScaleGroup {self.prev}: weight_offset applies to norms only, got a {self.prev_kind}")
        if self.prev_part is not None:
            if self.prev_kind != "linear":
                raise ValueError(f"ScaleGroup {self.prev}: prev_part applies to linears only, got a {self.prev_kind}")
            index, count = self.prev_part
            if not 0 <= index < count:
                raise ValueError(f"ScaleGroup {self.prev}: prev_part expected (index, count) with "
                                 f"0 <= index < count, got {self.prev_part}")
        if not self.linears:
            raise ValueError(f"ScaleGroup {self.prev}: expected at least one linear, got none")

    def describe(self) -> str:
        src = self.prev
        if self.weight_offset:
            src += f" (x*({self.weight_offset:g}+w))"
        if self.prev_part is not None:
            src += f" (rows part {self.prev_part[0] + 1} of {self.prev_part[1]})"
        return f"{src} -> {', '.join(self.linears)}"


@dataclass(frozen=True)
class FusedLinear:
    """One linear whose output rows hold several projections. It is one
    linear for quantization; what it holds matters for folding into part of
    its rows and for tensor parallelism (a column split would mix the parts)."""

    path: str
    parts: tuple[str, ...]  # in row order
    layout: str = "contiguous"  # or "per head" (each head's q, k, v rows side by side)


@dataclass(frozen=True)
class KVFacts:
    """What SimQuant needs to know about a model's attention."""

    # attention stores K/V through Cache.update(k, v, layer_idx) as
    # [batch, kv_heads, tokens, head_dim] in this transformers version
    cache_api: bool = True
    # the model's rotary embedding module when it is one rotate-half RoPE
    # shared by every layer (SimQuant can then quantize keys before RoPE);
    # None: keys are quantized after RoPE
    rotary_path: Optional[str] = None
    # a config flag under which the model uses no RoPE at all (Falcon's alibi)
    rope_off_flag: Optional[str] = None
    unsupported: str = ""  # why not, when cache_api is False

    def describe(self) -> str:
        if not self.cache_api:
            return f"not supported ({self.unsupported})"
        if self.rotary_path is None:
            return "supported, keys quantized as attention stores them (no invertible rotate-half RoPE declared)"
        return f"supported, keys quantized before RoPE through {self.rotary_path} when it is invertible"


@dataclass(frozen=True)
class TPLayout:
    """Megatron split of one decoder block: column- and row-parallel linears."""

    columns: tuple[str, ...]
    rows: tuple[str, ...]


@dataclass(frozen=True)
class MoEFacts:
    """A mixture-of-experts MLP: where its fused experts are, how to unfuse
    them (:mod:`.experts`), and the linears and groups of its blocks.

    A block holding ``experts`` is a MoE block: its linears are the ArchSpec's
    ``linears`` (attention), then ``shared`` (a shared expert's), then every
    expert's ``{experts}.{e}.gate_proj / up_proj / down_proj``. A block without
    it (DeepSeek-V3's first ``first_k_dense_replace`` layers, Qwen-MoE's
    ``mlp_only_layers``) is dense: ``linears`` + ``dense``.

    No norm group feeds the experts: ``post_attention_layernorm``'s output
    also feeds the float router, and one per-channel scale would have to serve
    every expert, each calibrated on different tokens. Smoothing inside an
    expert (its up_proj rows -> its down_proj, exact for ``act(gate) * up``)
    is declared by ``expert_up_down`` and uses that expert's own tokens.
    """

    experts: str  # path (in a block) of the fused experts module
    layout: str  # how its 3-D tensors map onto linears: "gate_up" or "gpt_oss" (models/experts.py)
    router: str  # the router (stays float; not an nn.Linear in transformers 5)
    shared: tuple[str, ...] = ()  # a shared expert's linears (every token)
    shared_groups: tuple[ScaleGroup, ...] = ()
    float_linears: tuple[str, ...] = ()  # nn.Linear gates kept float (Qwen2-MoE's shared_expert_gate)
    dense: tuple[str, ...] = ()  # the MLP linears of a dense block
    dense_groups: tuple[ScaleGroup, ...] = ()
    expert_up_down: bool = True  # up_proj -> down_proj folds exactly inside each expert

    def __post_init__(self):
        if self.layout not in ("gate_up", "gpt_oss"):
            raise ValueError(f"MoEFacts.layout: expected 'gate_up' or 'gpt_oss', got {self.layout!r}")


@dataclass(frozen=True)
class RotationFacts:
    """What rotating the residual stream by an orthogonal ``R`` needs
    (QuaRot; :mod:`.rotate`). The stream ``x`` becomes ``x R``: the embedding's
    rows and the readers' input columns (the norm groups' linears and the LM
    head, norms folded into them first) are multiplied by ``R``, the writers'
    output rows by ``R^T``. Exact only when every norm is an RMSNorm (no mean,
    no bias: ``|x R| = |x|``) and nothing else touches the stream."""

    embed: str  # token embedding (path in the model)
    writers: tuple[str, ...]  # block linears whose outputs are added into the stream
    head: str = "lm_head"
    norm_offset: float = 0.0  # the norms compute normalize(x) * (offset + w) (Gemma: 1)
    # block linears whose input rotation cannot be folded into the op before
    # them (down_proj reads act(gate) * up): rotated online (nn/input_rotation.py)
    online: tuple[str, ...] = ()
    # (v, o): each head's values rotated by a head_dim Hadamard, undone in o's
    # input columns; exact because attention mixes value rows per head linearly
    v_o: Optional[tuple[str, str]] = None


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    layers_path: str  # path of the ModuleList of decoder blocks
    linears: tuple[str, ...]  # quantizable linears inside one block, in forward order
    groups: tuple[ScaleGroup, ...]
    # groups valid only without grouped-query attention (v_proj -> o_proj)
    mha_only_groups: tuple[ScaleGroup, ...] = ()
    # modules between the last block and the LM head, in order (absent ones skipped)
    final: tuple[str, ...] = ()
    fused: tuple[FusedLinear, ...] = ()
    kv: KVFacts = KVFacts(cache_api=False, unsupported="no KV facts declared")
    tp: Optional[TPLayout] = None  # None: no tensor-parallel layout
    representative: str = ""  # the linear the plots show, taken from the middle block
    # block modules whose presence selects this variant of a model type (Falcon's
    # layer-norm layouts); the first variant whose modules block 0 has is used
    requires: tuple[str, ...] = ()
    variant: str = ""
    declared: bool = True  # False: found by the generic fallback
    # mixture of experts: then ``linears`` / ``groups`` are those every block
    # has (attention), and the MLP's come from ``moe`` per block
    moe: Optional[MoEFacts] = None
    rotation: Optional[RotationFacts] = None  # None: ``rotate`` refuses the type


_LLAMA_LIKE = ArchSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    groups=(
        ScaleGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
        # down_proj reads act(gate) * up: scaling up's output rows is exact
        ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",)),
    ),
    mha_only_groups=(ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",)),),
    final=("model.norm",),
    kv=KVFacts(rotary_path="model.rotary_emb"),
    # the attention derives its head count from the projection width
    tp=TPLayout(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
                ("self_attn.o_proj", "mlp.down_proj")),
    representative="mlp.down_proj",
    rotation=RotationFacts(embed="model.embed_tokens", writers=("self_attn.o_proj", "mlp.down_proj"),
                           online=("mlp.down_proj",), v_o=("self_attn.v_proj", "self_attn.o_proj")),
)

_OPT = ArchSpec(
    model_types=("opt",),
    layers_path="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    groups=(
        ScaleGroup("self_attn_layer_norm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("final_layer_norm", "norm", ("fc1",)),
    ),
    mha_only_groups=(ScaleGroup("self_attn.v_proj", "linear", ("self_attn.out_proj",)),),
    final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    kv=KVFacts(),  # learned absolute positions: no RoPE
    tp=TPLayout(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"), ("self_attn.out_proj", "fc2")),
    representative="fc2",
)

_GPT2 = ArchSpec(
    model_types=("gpt2",),
    layers_path="transformer.h",
    linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    groups=(
        ScaleGroup("ln_1", "norm", ("attn.c_attn",)),
        ScaleGroup("ln_2", "norm", ("mlp.c_fc",)),
    ),
    final=("transformer.ln_f",),
    fused=(FusedLinear("attn.c_attn", ("q", "k", "v")),),
    kv=KVFacts(),
    # no tp: the fused c_attn would mix q, k and v heads under a column split
    representative="mlp.c_proj",
)

_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_QKV = _QKVO[:3]
_V_TO_O = ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",))
_UP_TO_DOWN = ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",))

# Gemma's RMSNorm applies (1 + w): folding s gives w' = (1 + w) / s - 1
_GEMMA = ArchSpec(
    model_types=("gemma",),
    layers_path="model.layers",
    linears=_QKVO + _LLAMA_MLP,
    groups=(
        ScaleGroup("input_layernorm", "norm", _QKV, weight_offset=1.0),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj"), weight_offset=1.0),
        _UP_TO_DOWN,
    ),
    mha_only_groups=(_V_TO_O,),
    final=("model.norm",),
    kv=KVFacts(rotary_path="model.rotary_emb"),
    representative="mlp.down_proj",
    # the embedding's sqrt(hidden) multiplier is a scalar: it commutes with R
    rotation=RotationFacts(embed="model.embed_tokens", writers=("self_attn.o_proj", "mlp.down_proj"),
                           norm_offset=1.0, online=("mlp.down_proj",),
                           v_o=("self_attn.v_proj", "self_attn.o_proj")),
)

# Gemma 2/3 norm the attention and MLP *outputs* too (post_attention_layernorm,
# post_feedforward_layernorm): those feed the residual sum, not a linear. The
# MLP's input comes from pre_feedforward_layernorm.
# The output norms sit between the writers and the stream: normalize(y R) * w
# is not normalize(y) * w R, so no rotation.
_GEMMA2 = replace(
    _GEMMA,
    model_types=("gemma2",),
    rotation=None,
    groups=(
        ScaleGroup("input_layernorm", "norm", _QKV, weight_offset=1.0),
        ScaleGroup("pre_feedforward_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj"), weight_offset=1.0),
        _UP_TO_DOWN,
    ),
)

# Gemma 3's rotary module holds one frequency table per layer type (local /
# global): no single RoPE to invert, keys are quantized after RoPE
_GEMMA3 = replace(_GEMMA2, model_types=("gemma3_text",), kv=KVFacts())

_PHI3 = ArchSpec(
    model_types=("phi3",),
    layers_path="model.layers",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    groups=(
        ScaleGroup("input_layernorm", "norm", ("self_attn.qkv_proj",)),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.gate_up_proj",)),
        # down_proj reads up * act(gate), gate and up the two halves of
        # gate_up_proj's rows: dividing the up half's rows by s is exact
        ScaleGroup("mlp.gate_up_proj", "linear", ("mlp.down_proj",), prev_part=(1, 2)),
    ),
    # without GQA q, k and v are three equal parts; v is the last
    mha_only_groups=(ScaleGroup("self_attn.qkv_proj", "linear", ("self_attn.o_proj",), prev_part=(2, 3)),),
    final=("model.norm",),
    fused=(FusedLinear("self_attn.qkv_proj", ("q", "k", "v")), FusedLinear("mlp.gate_up_proj", ("gate", "up"))),
    kv=KVFacts(rotary_path="model.rotary_emb"),
    representative="mlp.down_proj",
    # v's rows are the last part of the fused qkv_proj: no per-head V/O rotation declared
    rotation=RotationFacts(embed="model.embed_tokens", writers=("self_attn.o_proj", "mlp.down_proj"),
                           online=("mlp.down_proj",)),
)

# parallel residual or not, attention reads input_layernorm and the MLP
# post_attention_layernorm. No linear -> linear group: v's rows interleave
# with q and k per head inside query_key_value, and a GELU separates the MLP's
# two linears.
_GPT_NEOX = ArchSpec(
    model_types=("gpt_neox",),
    layers_path="gpt_neox.layers",
    linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    groups=(
        ScaleGroup("input_layernorm", "norm", ("attention.query_key_value",)),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.dense_h_to_4h",)),
    ),
    final=("gpt_neox.final_layer_norm",),
    fused=(FusedLinear("attention.query_key_value", ("q", "k", "v"), layout="per head"),),
    kv=KVFacts(rotary_path="gpt_neox.rotary_emb"),  # partial rotary (rotary_pct < 1): keys after RoPE
    representative="mlp.dense_4h_to_h",
)

_FALCON_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                   "mlp.dense_4h_to_h")
# which layer norms exist is what the config's variant decides
# (new_decoder_architecture, parallel_attn, num_ln_in_parallel_attn), and the
# decoder layer's forward follows the same modules. No linear -> linear group:
# the fused query_key_value's v rows are per head or shared (multi-query).
_FALCON_TWO_LN = ArchSpec(
    model_types=("falcon",),
    layers_path="transformer.h",
    linears=_FALCON_LINEARS,
    groups=(
        ScaleGroup("ln_attn", "norm", ("self_attention.query_key_value",)),
        ScaleGroup("ln_mlp", "norm", ("mlp.dense_h_to_4h",)),
    ),
    final=("transformer.ln_f",),
    fused=(FusedLinear("self_attention.query_key_value", ("q", "k", "v"), layout="per head"),),
    kv=KVFacts(rotary_path="transformer.rotary_emb", rope_off_flag="alibi"),
    representative="mlp.dense_4h_to_h",
    requires=("ln_attn", "ln_mlp"),
    variant="new decoder architecture, one layer norm each for attention and MLP",
)
_FALCON_SEQUENTIAL = replace(
    _FALCON_TWO_LN,
    groups=(
        ScaleGroup("input_layernorm", "norm", ("self_attention.query_key_value",)),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.dense_h_to_4h",)),
    ),
    requires=("input_layernorm", "post_attention_layernorm"),
    variant="sequential attention and MLP (parallel_attn=False)",
)
_FALCON_PARALLEL = replace(
    _FALCON_TWO_LN,
    groups=(ScaleGroup("input_layernorm", "norm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),),
    requires=("input_layernorm",),
    variant="parallel attention and MLP reading one layer norm",
)

# attention and MLP both read the one input_layernorm. The rotary embedding
# is interleaved (pairs of adjacent channels), not rotate-half: keys after RoPE.
_COHERE = ArchSpec(
    model_types=("cohere",),
    layers_path="model.layers",
    linears=_QKVO + _LLAMA_MLP,
    groups=(ScaleGroup("input_layernorm", "norm", _QKV + ("mlp.gate_proj", "mlp.up_proj")), _UP_TO_DOWN),
    mha_only_groups=(_V_TO_O,),
    final=("model.norm",),
    kv=KVFacts(),
    representative="mlp.down_proj",
)

# OLMo-2 norms the attention and MLP outputs (post-norm): q/k/v and gate/up
# read the residual stream itself, so no norm group exists
_OLMO2 = ArchSpec(
    model_types=("olmo2",),
    layers_path="model.layers",
    linears=_QKVO + _LLAMA_MLP,
    groups=(_UP_TO_DOWN,),
    # v has no norm (q_norm / k_norm act on q and k only)
    mha_only_groups=(_V_TO_O,),
    final=("model.norm",),
    kv=KVFacts(rotary_path="model.rotary_emb"),
    representative="mlp.down_proj",
)

# LLaMA's modules; the embedding / residual / attention / logit multipliers
# scale whole tensors and do not touch the scale groups. No tp layout
# declared: not tested under tensor parallelism.
_GRANITE = replace(_LLAMA_LIKE, model_types=("granite",), tp=None)

_STARCODER2 = ArchSpec(
    model_types=("starcoder2",),
    layers_path="model.layers",
    linears=_QKVO + ("mlp.c_fc", "mlp.c_proj"),
    groups=(
        ScaleGroup("input_layernorm", "norm", _QKV),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.c_fc",)),
    ),
    mha_only_groups=(_V_TO_O,),
    final=("model.norm",),
    kv=KVFacts(rotary_path="model.rotary_emb"),
    representative="mlp.c_proj",
)

# ---------------------------------------------------------------- MoE
# transformers 5 fuses the experts into 3-D parameters; extraction unfuses
# them into one nn.Linear per expert projection (models/experts.py). No TP
# layout: experts are not split over ranks (expert parallelism is not built).
_ATTN_ONLY = dict(layers_path="model.layers", linears=_QKVO, groups=(ScaleGroup("input_layernorm", "norm", _QKV),),
                  mha_only_groups=(_V_TO_O,), final=("model.norm",), representative="self_attn.o_proj")
_SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")

_MIXTRAL = ArchSpec(model_types=("mixtral",), kv=KVFacts(rotary_path="model.rotary_emb"),
                    moe=MoEFacts(experts="mlp.experts", layout="gate_up", router="mlp.gate"), **_ATTN_ONLY)

# shared expert on every token, scaled by sigmoid(shared_expert_gate(x)): that
# one-row gate stays float, like the router
_QWEN2_MOE = ArchSpec(
    model_types=("qwen2_moe",), kv=KVFacts(rotary_path="model.rotary_emb"),
    moe=MoEFacts(experts="mlp.experts", layout="gate_up", router="mlp.gate", shared=_SHARED,
                 shared_groups=(ScaleGroup("mlp.shared_expert.up_proj", "linear", ("mlp.shared_expert.down_proj",)),),
                 float_linears=("mlp.shared_expert_gate",), dense=_LLAMA_MLP, dense_groups=(_UP_TO_DOWN,)),
    **_ATTN_ONLY)

_QWEN3_MOE = ArchSpec(
    model_types=("qwen3_moe",), kv=KVFacts(rotary_path="model.rotary_emb"),
    moe=MoEFacts(experts="mlp.experts", layout="gate_up", router="mlp.gate", dense=_LLAMA_MLP,
                 dense_groups=(_UP_TO_DOWN,)),
    **_ATTN_ONLY)

# experts transposed, gate/up interleaved, biases, clamped SwiGLU (up + 1):
# no exact up -> down fold. Attention sinks and sliding layers: keys are
# quantized as attention stores them.
_GPT_OSS = ArchSpec(model_types=("gpt_oss",), kv=KVFacts(),
                    moe=MoEFacts(experts="mlp.experts", layout="gpt_oss", router="mlp.router",
                                 expert_up_down=False), **_ATTN_ONLY)

# Multi-head latent attention: q through a low-rank q_a -> q_a_layernorm ->
# q_b (or one q_proj when q_lora_rank is None); k/v from one compressed latent
# (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj). The cache holds the
# latent and the shared RoPE key, not per-head K/V.
_MLA_KV = KVFacts(cache_api=False, unsupported="DeepSeek-V3's multi-head latent attention caches the compressed "
                                               "latent (kv_a_layernorm output) and one shared RoPE key, not "
                                               "per-head keys and values; SimQuant's per-channel key / per-token "
                                               "value quantization is not defined for them")
_DEEPSEEK_MOE = MoEFacts(experts="mlp.experts", layout="gate_up", router="mlp.gate",
                         shared=("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                                 "mlp.shared_experts.down_proj"),
                         shared_groups=(ScaleGroup("mlp.shared_experts.up_proj", "linear",
                                                   ("mlp.shared_experts.down_proj",)),),
                         dense=_LLAMA_MLP, dense_groups=(_UP_TO_DOWN,))
_DEEPSEEK_V3_LORA = ArchSpec(
    model_types=("deepseek_v3",),
    layers_path="model.layers",
    linears=("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
             "self_attn.o_proj"),
    groups=(ScaleGroup("input_layernorm", "norm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
            ScaleGroup("self_attn.q_a_layernorm", "norm", ("self_attn.q_b_proj",)),
            ScaleGroup("self_attn.kv_a_layernorm", "norm", ("self_attn.kv_b_proj",))),
    final=("model.norm",), kv=_MLA_KV, representative="self_attn.o_proj", moe=_DEEPSEEK_MOE,
    requires=("self_attn.q_a_proj",), variant="low-rank queries (q_lora_rank set)")
_DEEPSEEK_V3_Q = replace(
    _DEEPSEEK_V3_LORA,
    linears=("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"),
    groups=(ScaleGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
            ScaleGroup("self_attn.kv_a_layernorm", "norm", ("self_attn.kv_b_proj",))),
    requires=("self_attn.q_proj",), variant="full-rank queries (q_lora_rank None)")

# The six first: their order is the one error messages have always listed.
ARCHITECTURES: tuple[ArchSpec, ...] = (
    _LLAMA_LIKE, _OPT, _GPT2,
    _GEMMA, _GEMMA2, _GEMMA3, _PHI3, _GPT_NEOX, _FALCON_TWO_LN, _FALCON_SEQUENTIAL, _FALCON_PARALLEL, _COHERE,
    _OLMO2, _GRANITE, _STARCODER2,
    _MIXTRAL, _QWEN2_MOE, _QWEN3_MOE, _GPT_OSS, _DEEPSEEK_V3_LORA, _DEEPSEEK_V3_Q,
)
SUPPORTED_MODEL_TYPES = tuple(dict.fromkeys(t for a in ARCHITECTURES for t in a.model_types))


def declared_variants(model_type: str) -> list[ArchSpec]:
    """The declared specs of ``model_type`` (several when its variants differ), in table order."""
    return [a for a in ARCHITECTURES if model_type in a.model_types]


def head_dim(config) -> int:
    """Channels per attention head of a transformers config (its text config for
    multimodal ones): ``head_dim`` when set, else ``hidden_size / heads``."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hd = getattr(text, "head_dim", None)
    return int(hd) if hd else text.hidden_size // text.num_attention_heads


def kv_facts(model_type: str) -> Optional[KVFacts]:
    """SimQuant's facts for ``model_type``; None when it is not declared.
    (Variants of one type share them.)"""
    found = declared_variants(model_type)
    return found[0].kv if found else None


def tp_layout(model_type: str) -> Optional[TPLayout]:
    found = declared_variants(model_type)
    return found[0].tp if found else None


def tp_model_types() -> tuple[str, ...]:
    return tuple(t for t in SUPPORTED_MODEL_TYPES if tp_layout(t) is not None)
