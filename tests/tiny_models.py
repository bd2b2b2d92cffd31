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
    raise ValueError(model_type)


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
