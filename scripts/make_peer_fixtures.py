"""Write the llm-compressor peer fixtures of tests/test_peer_checkpoints.py.

Run with a Python that has llmcompressor installed (never the package's own
environment; llmcompressor pins its own transformers / compressed-tensors):

    python3.11 -m venv /work/lc-venv
    /work/lc-venv/bin/pip install torch-2.13.0+cpu-...whl    # a CPU torch first (else pip pulls the CUDA build)
    /work/lc-venv/bin/pip install llmcompressor "torch==2.13.0+cpu"
    /work/lc-venv/bin/python scripts/make_peer_fixtures.py [--out tests/fixtures/llmcompressor]

The fixtures were written with llmcompressor 0.14.0.1, compressed-tensors
0.19.0 (llmcompressor's pin), transformers 5.17.0, torch 2.13.0+cpu; a rerun
with those versions writes them byte for byte.

For each scheme it builds the same tiny random Llama from a config (nothing
downloaded), runs llm-compressor's ``oneshot`` on a few random token
sequences, saves the model compressed (``save_compressed=True``), then loads
the saved folder back the way a user of llm-compressor does
(``AutoModelForCausalLM.from_pretrained`` with compressed-tensors installed)
and stores that model's logits on fixed token ids in ``ref_logits.safetensors``
(``input_ids`` int64 [B, T], ``logits`` float32 [B, T, V]). Tokenizer and
generation files are dropped: the fixtures are token-id only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

VOCAB, SEED = 256, 0
# hidden 64 / intermediate 128: group size 32 divides every Linear's in_features
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
KEEP = {"config.json", "model.safetensors", "recipe.yaml"}


def _w4(symmetric: bool) -> dict:
    return {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                        "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                                    "group_size": 32}}}


def recipes():
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    return {
        # W4A16 as the preset, with group size 32 (the preset's 128 divides nothing here): GPTQ, actorder static
        "w4a16-g32-gptq": GPTQModifier(config_groups=_w4(True), ignore=["lm_head"]),
        # the asymmetric variant (packed zero-points), plain round-to-nearest with min/max observers
        "w4a16-g32-asym-rtn": QuantizationModifier(config_groups=_w4(False), ignore=["lm_head"]),
        # the W8A8 preset: int8 per-channel weights, dynamic per-token int8 activations (int-quantized)
        "w8a8-int8-gptq": GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    }


def calibration(n=8, seq=32):
    from datasets import Dataset

    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def ref_ids():
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(SEED + 2))


def tokenizer():
    """The tests' local byte-level tokenizer of exactly VOCAB ids: oneshot wants a processor when given a
    dataset, although the calibration set here is already token ids. (tests/tiny_models.py imports only
    torch and transformers, so the peer environment can import it.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import byte_tokenizer

    return byte_tokenizer()


def build():
    import transformers as tf

    torch.manual_seed(SEED)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


def make(name: str, recipe, out: Path) -> dict:
    import transformers as tf
    from llmcompressor import oneshot
    from safetensors.torch import save_file

    ids = ref_ids()
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        # oneshot and save_pretrained read the model's config (and recipe) back from model.config.name_or_path
        build().save_pretrained(tmp)
        model = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            float_logits = model(ids).logits.float().contiguous()  # before quantization
        oneshot(model=model, processor=tokenizer(), dataset=calibration(), recipe=recipe, num_calibration_samples=8,
                max_seq_length=32, shuffle_calibration_samples=False)
        with torch.no_grad():
            fake = model(ids).logits.float()  # llm-compressor's in-memory (fake-quantized) model
        model.save_pretrained(str(out), save_compressed=True)
    for f in os.listdir(out):
        if f not in KEEP:
            os.remove(out / f)
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(ids).logits.float().contiguous()
    save_file({"input_ids": ids.contiguous(), "logits": logits, "float_logits": float_logits},
              str(out / "ref_logits.safetensors"))
    qc = json.load(open(out / "config.json"))["quantization_config"]
    return {"name": name, "format": qc.get("format"), "fake_vs_loaded": float((fake - logits).abs().max()),
            "quant_error": float((float_logits - logits).abs().max()),
            "logit_absmax": float(logits.abs().max())}


README = """# llm-compressor fixture `{name}`

Written by llm-compressor itself (not by llmeasyquant), for
`tests/test_peer_checkpoints.py`: `llmeasyquant.load` must read this folder and
give the logits stored in `ref_logits.safetensors`.

* model: a random `LlamaForCausalLM` built from a config (vocab 256, hidden 64,
  intermediate 128, 2 layers, 4 heads, 2 KV heads, untied lm_head), seed {seed};
  no tokenizer (token ids only)
* recipe: `recipe.yaml` (llm-compressor's own dump); `oneshot` on 8 random
  sequences of 32 token ids (seed {seed1}), `save_compressed=True`
* quantization_config.format: `{format}`
* `ref_logits.safetensors`: `input_ids` int64 [2, 12] (seed {seed2}) and
  `logits` float32 [2, 12, 256] of the folder loaded back with
  `transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=float32)`
  (compressed-tensors installed). Max |logit| {absmax:.4f}; the in-memory model
  right after `oneshot` gave the same logits to {fake:.3g}; `float_logits` are the
  unquantized model's (max |difference| from `logits`: {qerr:.3g}, the quantization error).
* generated {date} with `{cmd}`
* versions: {versions}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures/llmcompressor"))
    ap.add_argument("--only", nargs="*", help="fixture names to write (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    vers = versions()
    for name, recipe in recipes().items():
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / name
        info = make(name, recipe, out)
        (out / "README.md").write_text(README.format(
            name=name, seed=SEED, seed1=SEED + 1, seed2=SEED + 2, format=info["format"], absmax=info["logit_absmax"],
            fake=info["fake_vs_loaded"], qerr=info["quant_error"], date=datetime.date.today().isoformat(),
            cmd="python scripts/make_peer_fixtures.py", versions=", ".join(f"{k} {v}" for k, v in vers.items())))
        size = sum(f.stat().st_size for f in out.iterdir())
        print(json.dumps({**info, "bytes": size}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
