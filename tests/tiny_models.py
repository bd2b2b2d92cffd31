"""Tiny random-weight Hugging Face models of every supported architecture,
built locally from configs (no downloads)."""

import torch
import transformers as tf

VOCAB = 256


def _common(**kw):
    return dict(vocab_size=VOCAB, **kw)


def build(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
        cfg_cls, model_cls = cls[model_type]
        extra = {"head_dim": 16} if model_type == "qwen3" else {}
        cfg = cfg_cls(**_common(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256, **extra))
        return model_cls(cfg).eval()
    if model_type == "opt":
        cfg = tf.OPTConfig(**_common(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=256, word_embed_proj_dim=64))
        return tf.OPTForCausalLM(cfg).eval()
    if model_type == "gpt2":
        cfg = tf.GPT2Config(**_common(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0))
        return tf.GPT2LMHeadModel(cfg).eval()
    if model_type in DENSE:
        model = _dense(model_type)
        _perturb_norms(model)
        return model.eval()
    if model_type in MOE:
        model = _moe(model_type)
        _perturb_norms(model)
        _decisive_routers(model)
        return model.eval()
    raise ValueError(model_type)


# mixture-of-experts architectures (fused 3-D experts in transformers 5), as
# build names: "deepseek_v3-q" is DeepSeek-V3 with full-rank queries
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "deepseek_v3-q")
N_EXPERTS, TOP_K = 4, 2


def _moe(name: str):
    ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    base = _common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, num_experts_per_tok=TOP_K, **ids)
    if name == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**base, intermediate_size=32, num_local_experts=N_EXPERTS))
    if name == "qwen2_moe":  # shared expert + its sigmoid gate
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**base, intermediate_size=48, moe_intermediate_size=16,
                                                        shared_expert_intermediate_size=32, num_experts=N_EXPERTS,
                                                        norm_topk_prob=True))
    if name == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layer 1 MoE
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**base, intermediate_size=48, moe_intermediate_size=16,
                                                        num_experts=N_EXPERTS, head_dim=8, mlp_only_layers=[0]))
    if name == "gpt_oss":  # sliding + full attention layers, sinks, biased transposed experts
        base["max_position_embeddings"] = 4096  # YaRN: original_max_position_embeddings 4096
        return tf.GptOssForCausalLM(tf.GptOssConfig(**base, intermediate_size=16, num_local_experts=N_EXPERTS,
                                                    head_dim=8, sliding_window=8,
                                                    layer_types=["sliding_attention", "full_attention"]))
    if name.startswith("deepseek_v3"):  # layer 0 dense, layer 1 MoE with a shared expert; MLA
        base["num_key_value_heads"] = 4
        q = dict(q_lora_rank=None) if name == "deepseek_v3-q" else dict(q_lora_rank=16)
        return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            **base, **q, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=N_EXPERTS,
            n_group=2, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))
    raise ValueError(name)


# the architectures covered by explicit ArchSpecs beyond the original six, as
# build names: a Falcon variant is "falcon-<variant>" (model type "falcon")
DENSE = ("gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "falcon", "falcon-new-arch", "falcon-sequential",
         "falcon-alibi", "cohere", "olmo2", "granite", "starcoder2")


def _dense(name: str):
    ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    base = _common(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256, **ids)
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**base, num_key_value_heads=2, head_dim=16))
    if name == "gemma2":  # a sliding window shorter than the test sequences
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**base, num_key_value_heads=2, head_dim=16, sliding_window=8))
    if name == "gemma3_text":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**base, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                        layer_types=["sliding_attention", "full_attention"]))
    if name == "phi3":  # MHA: the v part of the fused qkv_proj folds into o_proj
        return tf.Phi3ForCausalLM(tf.Phi3Config(**base, num_key_value_heads=4))
    if name == "gpt_neox":  # partial rotary (rotary_pct 0.25), parallel residual
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**base))
    if name.startswith("falcon"):
        variant = {"falcon": {},  # parallel attention + MLP on one layer norm, multi-query
                   "falcon-new-arch": dict(new_decoder_architecture=True, num_kv_heads=2),
                   "falcon-sequential": dict(parallel_attn=False, multi_query=False),
                   "falcon-alibi": dict(alibi=True)}[name]  # no RoPE: positions are attention biases
        cfg = {k: v for k, v in base.items() if k != "intermediate_size"}
        return tf.FalconForCausalLM(tf.FalconConfig(**cfg, ffn_hidden_size=128, **variant))
    if name == "cohere":  # MHA: v_proj -> o_proj folds too
        return tf.CohereForCausalLM(tf.CohereConfig(**base, num_key_value_heads=4))
    if name == "olmo2":  # MHA: v_proj -> o_proj is its only attention group
        return tf.Olmo2ForCausalLM(tf.Olmo2Config(**base, num_key_value_heads=4))
    if name == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**base, num_key_value_heads=2, embedding_multiplier=2.0,
                                                      residual_multiplier=0.5, attention_multiplier=0.2,
                                                      logits_scaling=4.0))
    if name == "starcoder2":
        return tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**base, num_key_value_heads=2))
    raise ValueError(name)


@torch.no_grad()
def _perturb_norms(model):
    """Norm weights away from their init (ones, or zeros for Gemma's 1 + w) so
    folding into them is tested for real."""
    g = torch.Generator().manual_seed(11)
    for m in model.modules():
        if "norm" in type(m).__name__.lower():
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, torch.nn.Parameter):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _decisive_routers(model, factor: float = 10.0):
    """Router weights x10: a random init (std 0.02) puts many tokens at a near
    tie between experts, where a W8-sized perturbation upstream flips a token
    to another expert, a discrete jump of its logits that is routing, not
    quantization error. Trained routers have margins."""
    for name, m in model.named_modules():
        if name.endswith((".mlp.gate", ".mlp.router")) and not isinstance(m, torch.nn.Linear):
            m.weight.mul_(factor)


def byte_tokenizer():
    """A byte-level tokenizer with exactly VOCAB = 256 ids (one per byte, no
    merges), built locally, so tiny models can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    return tok


ALL = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


def calib_batches(n: int = 2, T: int = 16, seed: int = 0) -> list:
    """n calibration batches of T random token ids (batch 1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, T), generator=g) for _ in range(n)]


def token_ids(batch: int = 1, T: int = 20, seed: int = 9):
    """Evaluation token ids [batch, T]."""
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def max_rel(out, ref) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((out - ref).abs().max() / ref.abs().max()).item()


def make_act_order(model, seed=0):
    """Every QLinear made act-order: the same held weights and scales, a random
    input permutation (a new model, as GPTQ's desc_act produces)."""
    from llmeasyquant.nn.qlinear import QLinear

    g = torch.Generator().manual_seed(seed)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]:
        new = QLinear.from_spec({**m.spec(), "in_perm": True})
        # ascending inside each group: the order a g_idx reader rebuilds (g_idx says which group
        # a column is in, not where inside it), so save -> load can be bit-identical
        gsize = m.in_features if m.w_group_size == -1 else m.w_group_size
        perm = torch.randperm(m.in_features, generator=g).view(-1, gsize).sort(dim=1).values.flatten()
        new.load_state_dict({**m.state_dict(), "in_perm": perm})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def awq_save_load(model, ids, folder):
    """Quantize ``model`` in place with AWQ W4 g16 (folded scales, packed 4-bit
    weights with zero-points), save it and load it back: (logits before, the
    loaded model, its logits)."""
    import llmeasyquant as lq

    lq.quantize(model, "awq", calib=calib_batches(), progress=False, w_bits=4, w_group_size=16, grid=5)
    ref = model(ids).logits
    lq.save(model, folder)
    back = lq.load(folder)
    assert type(back) is type(model) and back.llmeq_config.method == "awq"
    return ref, back, back(ids).logits

