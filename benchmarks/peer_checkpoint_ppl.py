"""Peer-written checkpoints of the default model: llm-compressor quantizes
SmolLM2-135M and computes its own WikiText-2 perplexity; llmeasyquant loads
the same folders and must give that perplexity within 0.1 % (issue 19).

Two parts, in two environments (llm-compressor pins its own transformers and
compressed-tensors, so it never runs in the package's environment):

* ``peer`` (the llm-compressor venv; imports neither llmeasyquant nor its
  native extension): for each scheme, ``oneshot`` on a fresh fp32 copy of the
  default model, ``save_pretrained(save_compressed=True)`` under
  ``--out/<name>/`` with the tokenizer, then the folder loaded back the way an
  llm-compressor user does (``AutoModelForCausalLM.from_pretrained(dir,
  dtype=float32)``) and its perplexity. Also the float model's perplexity and
  the evaluation token ids (``--out/eval_ids.pt``), so the other part can check
  its tokenization is the same. Writes ``--out/peer_ppl.json``.
* ``ours`` (the package environment): ``llmeasyquant.load(dir)`` and
  ``llmeasyquant.eval.perplexity.perplexity(model, tok, seq_len, max_windows)``
  for each folder, the float model the same way, and (``--transformers``) the
  folders loaded by this environment's transformers + compressed-tensors.
  Writes ``--out/ours_ppl.json`` and prints a markdown table.

The peer part replicates ``llmeasyquant.eval.perplexity`` exactly: the whole
raw test file read as UTF-8, tokenized once with the model's tokenizer
(``tokenizer(text, return_tensors="pt").input_ids[0]``), non-overlapping
windows of ``seq_len`` tokens from the start (partial last window dropped),
the first ``max_windows`` of them, one forward per window (``use_cache=False``),
fp32 logits, exp(mean NLL) over the ``seq_len - 1`` predicted tokens of every
window. GPTQ calibration replicates ``llmeasyquant.calibration.
calibration_batches`` (seed 0 random windows of the tokenized validation file).

Run (one core, one thread):

    OMP_NUM_THREADS=1 /work/lc-venv/bin/python benchmarks/peer_checkpoint_ppl.py peer --out /work/peer-ckpt
    OMP_NUM_THREADS=1 PYTHONPATH=python .venv/bin/python benchmarks/peer_checkpoint_ppl.py ours \\
        --out /work/peer-ckpt --transformers
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

SCHEMES = ("w4a16-g64-rtn", "w4a16-g64-gptq", "w8a8-int8-rtn")


def _default_model_dir() -> str:
    # llmeasyquant.models.loader.default_model_dir(), without importing llmeasyquant
    root = os.environ.get("LLMEQ_CACHE_DIR") or str(Path.home() / ".cache" / "llmeasyquant")
    return str(Path(root).expanduser() / "smollm2-135m-instruct-0.1.2")


def _default_data_dir() -> str:
    return os.environ.get("LLMEQ_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions(names) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in names:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


# --------------------------------------------------------------------------- #
# the protocol of llmeasyquant.eval.perplexity, replicated for the peer env
# --------------------------------------------------------------------------- #
def read_text(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def tokenize_file(tokenizer, path) -> torch.Tensor:
    return tokenizer(read_text(path), return_tensors="pt").input_ids[0]


@torch.no_grad()
def ref_perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int) -> dict:
    starts = list(range(0, ids.numel() - seq_len + 1, seq_len))[:max_windows]
    total_nll, count = 0.0, 0
    for s in starts:
        window = ids[s: s + seq_len].unsqueeze(0)
        logits = model(window, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        target = window[0, 1:]
        total_nll -= logp.gather(1, target.unsqueeze(1)).sum().item()
        count += target.numel()
    nll = total_nll / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(starts)}


def calibration_batches(tokenizer, path, n_samples: int, seq_len: int, seed: int = 0) -> list:
    """llmeasyquant.calibration.calibration_batches for a file path."""
    ids = tokenizer(read_text(path), return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return [ids[s: s + seq_len] for s in starts.tolist()]


# --------------------------------------------------------------------------- #
# part (a): llm-compressor
# --------------------------------------------------------------------------- #
def _w4_g64() -> dict:
    return {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                    "group_size": 64}}}


def _recipe(name: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if name == "w4a16-g64-rtn":  # round-to-nearest, min/max observers, symmetric int4, groups of 64 along K
        return QuantizationModifier(config_groups=_w4_g64(), ignore=["lm_head"])
    if name == "w4a16-g64-gptq":
        return GPTQModifier(config_groups=_w4_g64(), ignore=["lm_head"])
    if name == "w8a8-int8-rtn":  # the W8A8 preset: int8 per-channel weights, dynamic per-token int8 activations
        return QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    raise ValueError(name)


def peer(args) -> int:
    import transformers as tf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir) / "wikitext-2"
    tok = tf.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    ids = tokenize_file(tok, data / "wiki.test.raw")
    torch.save(ids, out / "eval_ids.pt")
    res_path = out / "peer_ppl.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res.update({"date": datetime.date.today().isoformat(), "cpu": _cpu_name(), "threads": torch.get_num_threads(),
                "versions": _versions(("llmcompressor", "compressed-tensors", "transformers", "torch")),
                "model": args.model, "eval_tokens_total": int(ids.numel()), "seq_len": args.seq_len,
                "max_windows": args.windows, "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens "
                                                            "of wiki.valid.tokens (seed 0 random windows)"})
    res.setdefault("ppl", {})

    def dump():
        res_path.write_text(json.dumps(res, indent=2))

    if "float" in args.only or not args.only:
        t = time.time()
        model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
        res["ppl"]["float"] = {**ref_perplexity(model, ids, args.seq_len, args.windows), "eval_s": time.time() - t}
        print("float", res["ppl"]["float"], flush=True)
        dump()
        del model
    for name in SCHEMES:
        if args.only and name not in args.only:
            continue
        from llmcompressor import oneshot

        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
        kw = {}
        if "gptq" in name:
            from datasets import Dataset

            cal = calibration_batches(tok, data / "wiki.valid.tokens", args.calib_samples, args.calib_seq_len)
            kw = dict(dataset=Dataset.from_dict({"input_ids": [c.tolist() for c in cal],
                                                 "attention_mask": [[1] * c.numel() for c in cal]}),
                      num_calibration_samples=args.calib_samples, max_seq_length=args.calib_seq_len,
                      shuffle_calibration_samples=False)
        t = time.time()
        oneshot(model=model, processor=tok, recipe=_recipe(name), **kw)
        quant_s = time.time() - t
        model.save_pretrained(str(folder), save_compressed=True)
        tok.save_pretrained(str(folder))
        del model
        t = time.time()
        loaded = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        r = ref_perplexity(loaded, ids, args.seq_len, args.windows)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        res["ppl"][name] = {**r, "quant_s": quant_s, "eval_s": time.time() - t, "format": qc.get("format"),
                            "loaded_as": sorted({type(m).__name__ for m in loaded.modules()
                                                 if "Linear" in type(m).__name__})}
        print(name, res["ppl"][name], flush=True)
        dump()
        del loaded
    return 0


# --------------------------------------------------------------------------- #
# part (b): llmeasyquant (and this env's transformers) on the same folders
# --------------------------------------------------------------------------- #
def ours(args) -> int:
    import transformers as tf

    import llmeasyquant as lq
    from llmeasyquant.eval.perplexity import perplexity
    from llmeasyquant.models import load_default_model

    out = Path(args.out)
    peer_res = json.loads((out / "peer_ppl.json").read_text())
    data = Path(args.data_dir) / "wikitext-2"
    res = {"date": datetime.date.today().isoformat(), "cpu": _cpu_name(), "threads": torch.get_num_threads(),
           "isa": lq.build_info().get("cpu_isa_active"),
           "versions": _versions(("llmeasyquant", "compressed-tensors", "transformers", "torch")), "rows": {}}
    if (out / "ours_ppl.json").exists():  # keep rows of earlier runs (--only)
        res["rows"] = json.loads((out / "ours_ppl.json").read_text()).get("rows", {})
    rows = res["rows"]

    def check_ids(tok):
        ref = torch.load(out / "eval_ids.pt")
        mine = tok(read_text(data / "wiki.test.raw"), return_tensors="pt").input_ids[0]
        return bool(torch.equal(ref, mine))

    def ppl_of(model, tok):
        return perplexity(model, tok, path=str(data / "wiki.test.raw"), seq_len=args.seq_len,
                          max_windows=args.windows, progress=False)

    names = ["float"] + [n for n in SCHEMES if n in peer_res["ppl"]]
    for name in names:
        if args.only and name not in args.only:
            continue
        row = {"peer": peer_res["ppl"][name]["ppl"]}
        t = time.time()
        if name == "float":
            model, tok = load_default_model()
        else:
            model, tok = lq.load(out / name, with_tokenizer=True)
        row["same_eval_ids"] = check_ids(tok)
        p = ppl_of(model.eval(), tok)
        row.update(ours=p.ppl, tokens=p.tokens, windows=p.windows, eval_s=time.time() - t,
                   rel_diff=(p.ppl - row["peer"]) / row["peer"])
        del model
        if args.transformers and name != "float":
            t = time.time()
            try:
                theirs = tf.AutoModelForCausalLM.from_pretrained(str(out / name), dtype=torch.float32).eval()
                row["tf_here"] = ppl_of(theirs, tok).ppl
                row["tf_here_rel_diff"] = (row["tf_here"] - row["peer"]) / row["peer"]
                del theirs
            except Exception as err:  # report, do not hide: the question is whether it loads
                row["tf_here"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            row["tf_here_s"] = time.time() - t
        rows[name] = row
        print(name, row, flush=True)
        (out / "ours_ppl.json").write_text(json.dumps(res, indent=2))
    print(f"\n| checkpoint | peer ppl (llm-compressor env) | ours ppl (`llmeasyquant.load`) | rel diff |"
          f"{' package-env transformers ppl | rel diff |' if args.transformers else ''}\n"
          f"|---|---|---|---|{'---|---|' if args.transformers else ''}")
    for name, r in rows.items():
        line = f"| {name} | {r['peer']:.4f} | {r['ours']:.4f} | {100 * r['rel_diff']:+.4f} % |"
        if args.transformers:
            tfp = r.get("tf_here")
            line += (f" {tfp:.4f} | {100 * r['tf_here_rel_diff']:+.4f} % |" if isinstance(tfp, float)
                     else f" {tfp or '-'} | |")
        print(line)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("peer", "ours"))
    ap.add_argument("--out", default="/work/peer-ckpt")
    ap.add_argument("--model", default=_default_model_dir())
    ap.add_argument("--data-dir", default=_default_data_dir())
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=[], help="float and/or scheme names (default: all)")
    ap.add_argument("--transformers", action="store_true",
                    help="ours: also load the folders with this environment's transformers")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return peer(args) if args.part == "peer" else ours(args)


if __name__ == "__main__":
    sys.exit(main())
