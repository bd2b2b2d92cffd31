"""Prepare the llama.cpp side of benchmarks/bench_e2e_cpu.py, once, offline.

Makes GGUF files of exactly the weights our toolkit uses for the default model
(the fp32 Hugging Face folder that ``llmeasyquant.models.load_model``
converts once from the shipped Q4_1 GGUF into ``~/.cache/llmeasyquant/``):

1. ``convert_hf_to_gguf.py`` from llama.cpp (the copy vendored in the
   llama-cpp-python sdist, with its own ``gguf-py``) turns that folder into an
   f32 GGUF.  It runs in *our* venv (it needs torch + transformers, which the
   bench venv does not have).  Two shims, both inside this process only:
   ``mistral_common`` (imported unconditionally by the script, used only for
   Mistral-format models) is stubbed, and transformers 5's config, which keeps
   ``rope_theta`` under ``rope_parameters``, is given the top-level
   ``rope_theta`` the script reads (without it the GGUF silently gets
   llama.cpp's default base 10000 instead of SmolLM2's 100000).
2. ``llama_cpp.llama_model_quantize`` in the bench venv (llama-cpp-python,
   never one of our requirements) writes Q8_0 and Q4_0 from the f32 file.

Prepare (about 2 minutes; the bench venv build about 15 minutes on 2 cores):

    python3.11 -m venv /work/bench-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        nice -n 10 /work/bench-venv/bin/pip install llama_cpp_python-0.3.16.tar.gz
    tar -xzf llama_cpp_python-0.3.16.tar.gz -C /work/lcp-src
    python benchmarks/e2e_prepare_gguf.py --llama-cpp-src /work/lcp-src/llama_cpp_python-0.3.16 \\
        --bench-python /work/bench-venv/bin/python --out /work/e2e-gguf

It writes ``smollm2-135m-f32.gguf``, ``smollm2-135m-q8_0.gguf`` and
``smollm2-135m-q4_0.gguf`` into ``--out`` and prints their paths.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# Run inside a child of our own python: stub mistral_common, patch rope_theta,
# then execute convert_hf_to_gguf.py as __main__.
_CONVERT_SHIM = r"""
import runpy, sys, types
import transformers  # first: it probes for mistral_common itself and would trip on the stubs

for name in ("mistral_common", "mistral_common.tokens", "mistral_common.tokens.tokenizers",
             "mistral_common.tokens.tokenizers.base", "mistral_common.tokens.tokenizers.multimodal",
             "mistral_common.tokens.tokenizers.tekken", "mistral_common.tokens.tokenizers.sentencepiece"):
    sys.modules[name] = types.ModuleType(name)
m = sys.modules
m["mistral_common.tokens.tokenizers.base"].TokenizerVersion = None
m["mistral_common.tokens.tokenizers.multimodal"].DATASET_MEAN = None
m["mistral_common.tokens.tokenizers.multimodal"].DATASET_STD = None
m["mistral_common.tokens.tokenizers.tekken"].Tekkenizer = None
m["mistral_common.tokens.tokenizers.sentencepiece"].SentencePieceTokenizer = None

_orig = transformers.AutoConfig.from_pretrained


def _from_pretrained(*a, **k):
    cfg = _orig(*a, **k)
    plain = cfg.to_dict

    def to_dict():
        d = plain()
        rp = d.get("rope_parameters") or {}
        if d.get("rope_theta") is None and "rope_theta" in rp:
            d["rope_theta"] = rp["rope_theta"]
        return d

    cfg.to_dict = to_dict  # this object only; transformers' own callers see a normal config
    return cfg


transformers.AutoConfig.from_pretrained = _from_pretrained
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_QUANTIZE = r"""
import ctypes, sys
import llama_cpp
src, dst, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
p.nthread = threads
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
sys.exit(rc)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp-src", required=True, type=Path,
                    help="unpacked llama-cpp-python sdist (holds vendor/llama.cpp/convert_hf_to_gguf.py)")
    ap.add_argument("--bench-python", required=True, type=Path, help="python of the venv with llama-cpp-python")
    ap.add_argument("--out", required=True, type=Path, help="folder for the GGUF files")
    ap.add_argument("--model", default="smollm2-135m", help="our model name or HF folder (default smollm2-135m)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    convert = args.llama_cpp_src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not convert.is_file():
        sys.exit(f"e2e_prepare_gguf: no {convert}; --llama-cpp-src must be the unpacked llama-cpp-python sdist")
    if not args.bench_python.is_file():
        sys.exit(f"e2e_prepare_gguf: no bench python at {args.bench_python}")
    from llmeasyquant.models.loader import resolve_model_path

    hf = Path(resolve_model_path(args.model))
    if not (hf / "config.json").is_file():
        sys.exit(f"e2e_prepare_gguf: {args.model} did not resolve to an HF folder (got {hf})")
    args.out.mkdir(parents=True, exist_ok=True)
    f32 = args.out / "smollm2-135m-f32.gguf"
    subprocess.run([sys.executable, "-c", _CONVERT_SHIM, str(convert), str(hf), "--outtype", "f32",
                    "--outfile", str(f32)], check=True)
    # LLAMA_FTYPE_MOSTLY_Q8_0 = 7, LLAMA_FTYPE_MOSTLY_Q4_0 = 2 (llama.h)
    for name, ftype in (("q8_0", 7), ("q4_0", 2)):
        dst = args.out / f"smollm2-135m-{name}.gguf"
        subprocess.run([str(args.bench_python), "-c", _QUANTIZE, str(f32), str(dst), str(ftype), str(args.threads)],
                       check=True)
        print(dst)
    print(f32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
