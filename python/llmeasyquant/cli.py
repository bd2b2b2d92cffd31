"""The ``llmeasyquant`` command line.

Commands:
  info      what this installation was built with (--arch MODEL: what llmeasyquant finds in a model)
  bench     QLinear and op microbenchmarks (llmeasyquant.bench)
  compare   quantize a model with several methods; perplexity, memory, tokens/s table
  quantize  quantize a model with one method and save it (safetensors folder)
  search    per-layer mixed-precision bit widths under a size budget (llmeasyquant.search)
  eval      perplexity / memory / tokens/s of a model or a saved quantized folder
  export    export a saved quantized model to ONNX (checked in ONNX Runtime), compressed-tensors, GPTQ or AWQ
  demo      quantize one real layer of the default model with QLinear and compare (llmeasyquant.demo)

This module only parses arguments and prints: every command calls library
functions with typed arguments (never the argparse namespace), so what the
CLI does can be done, and tested, from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import llmeasyquant as lq

    if args.arch is not None:
        from .io import load_any
        from .models.describe import describe, format_report

        model, _ = load_any(args.arch, trust_remote_code=args.trust_remote_code)
        print(format_report(describe(model)))
        return 0
    info = lq.build_info()
    print(f"llmeasyquant {info['version']}")
    print(f"  built against torch {info['torch_version']} (running torch {info['torch_version_runtime']})")
    if info["cuda"]:
        print(f"  CUDA kernels: on (archs {info['cuda_archs']}, CUDA runtime {info['cuda_runtime_version']}); "
              f"GPU here: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    else:
        print("  CUDA build: off")
    print(f"  CPU kernels: {', '.join(info['cpu_kernels_compiled'])}; this CPU: {info['cpu_isa_detected']}, "
          f"in use: {info['cpu_isa_active']}")
    print(f"  OpenMP: {'on' if info['openmp'] else 'off'}; torch threads: {torch.get_num_threads()}")
    print(f"  python {platform.python_version()} on {platform.machine()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo
    from .models import load_model

    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    res = run_demo(model, tok, text_path=args.text, tokens=args.tokens, layer=args.layer, proj=args.proj,
                   reps=args.reps)
    print(format_demo(res))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    cmd = "llmeasyquant bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "llmeasyquant bench"
    header, table = bench.run(**bench_options(args), command=cmd)
    print(f"\n{header}\n\n{table}")
    return 0


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llmeasyquant bench`` (also benchmarks/bench_qlinear.py's)."""
    from .bench import CPU_SHAPES, TOKENS

    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--reps", type=int, default=50, help="timed runs per round (median; default 50)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the spread across rounds is reported (default 3)")
    p.add_argument("--shapes", default="llama", choices=sorted(CPU_SHAPES),
                   help="layer shapes N x K (default llama: LLaMA-7B's)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens M per call, comma-separated")
    p.add_argument("--ops", action="store_true", help="also time the ops alone (quantize, int8 GEMM, weight-only)")


def bench_options(args: argparse.Namespace) -> dict:
    """:func:`llmeasyquant.bench.run`'s keyword arguments from the options of :func:`add_bench_arguments`."""
    from .bench import parse_tokens

    # parsed here, not by argparse: a bad --tokens is then main's one-line error (exit 2), not a usage dump
    return dict(threads=args.threads, reps=args.reps, rounds=args.rounds, shapes=args.shapes,
                tokens=parse_tokens(args.tokens), ops=args.ops)


def _named_texts(specs: list[str] | None) -> dict[str, str]:
    """--text NAME=FILE (repeated) -> {NAME: FILE}, every file checked before any model loads."""
    out = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--text expects NAME=FILE (e.g. legal=licenses.txt), got {spec!r}")
        if name in out:
            raise ValueError(f"--text: the name {name!r} is given twice")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--text {spec}: no such file: {path}")
        out[name] = path
    return out


def _cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from .compare import format_table, resolve_methods, run_compare
    from .models import load_model

    presets = resolve_methods(args.methods)
    texts = _named_texts(args.text)
    if args.out:
        from .outdir import check_writable_folder

        check_writable_folder(args.out, what="compare --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run_compare(lambda: load_model(args.model, trust_remote_code=args.trust_remote_code), presets,
                       out_dir=args.out, seq_len=args.seq_len,
                       max_windows=None if args.max_windows == 0 else args.max_windows,
                       calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                       speed=not args.no_speed, resume=args.resume, progress=not args.quiet,
                       command="llmeasyquant " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                       model_name=args.model, texts=texts)
    print(format_table(rows))
    print(f"\n({rows[0]['protocol']}; {time.perf_counter() - t0:.0f} s in all"
          + (f"; written to {args.out}/compare.{{md,csv,json}})" if args.out else ")"))
    return 0


def method_options(pairs: list[str]) -> dict:
    """``--option KEY=VALUE`` pairs as config overrides: VALUE read as JSON
    (``80``, ``true``, ``[0.4, 0.6]``), else as the text itself (``base=gptq``)."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option: expected KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[key.strip().replace("-", "_")] = value
    return out


def _cmd_quantize(args: argparse.Namespace) -> int:
    import llmeasyquant as lq
    from llmeasyquant.models import load_model

    from .io import check_save_destination

    opts = {}
    for key in ("w_bits", "w_group_size", "act", "w_scale_dtype"):
        v = getattr(args, key)
        if v is not None:
            opts[key] = None if v == "none" else v
    if args.calib_samples is not None:
        opts["n_calib"] = args.calib_samples
    from .methods.base import config_for

    opts.update(method_options(args.option))
    if args.lm_head == "method":
        # the method's exclude list (or the one given) without lm_head
        kept = opts.get("exclude", config_for(args.method, **opts).exclude)
        opts["exclude"] = [e for e in kept if e != "lm_head"]
    elif args.lm_head == "w8":
        opts["lm_head"] = "w8"
    config_for(args.method, **opts)  # unknown or bad options fail now, before the model is loaded
    # the destination is checked before the work, not after an hour of it
    out = check_save_destination(args.out, args.overwrite)
    if args.distributed:
        from .distributed.command import quantize_distributed

        from .calibration import GENERATED

        if args.calib == GENERATED:
            raise ValueError("--calib generated is not supported with --distributed (ranks sampling on their own "
                             "could write different text); run it in one process")

        report = quantize_distributed(model=args.model, method=args.method, out=args.out, calib=args.calib,
                                      data_parallel=args.data_parallel, backend=args.backend, device=args.device,
                                      timeout_s=args.timeout, breakdown=args.breakdown, overwrite=args.overwrite,
                                      quiet=args.quiet, trust_remote_code=args.trust_remote_code, options=opts)
        if report is not None:  # rank 0
            print(report)
        return 0
    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    lq.quantize(model, args.method, calib=args.calib, tokenizer=tok, progress=not args.quiet, device=args.device,
                **opts)
    lq.save(model, out, tokenizer=tok, overwrite=args.overwrite)
    rep = model.llmeq_report
    print(f"{rep.description}: quantized in {rep.seconds:.1f} s ({rep.memory.summary()}), saved to {args.out} "
          f"(load with llmeasyquant.load({args.out!r}))")
    if rep.pipeline is not None:
        print(f"  blockwise: {rep.pipeline.summary()}")
    return 0


def _parse_floats(spec: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {spec!r}") from None
    if not vals:
        raise ValueError(f"{what} is empty")
    return vals


def _cmd_search(args: argparse.Namespace) -> int:
    from .models import load_model
    from .search import Searcher, calibration_and_probe
    from .search.report import check_search_destination, write_search_output

    given = [v is not None for v in (args.budget_bits, args.budget_mib, args.lam)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --budget-bits, --budget-mib and --lam")
    bits = tuple(int(b) for b in _parse_floats(args.bits, "--bits"))
    budgets = _parse_floats(args.pareto, "--pareto") if args.pareto else []
    # the destination is checked before the work, not after it
    out = check_search_destination(args.out, overwrite=args.overwrite)
    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    t0 = time.perf_counter()
    batches, probe = calibration_and_probe(tok, args.calib, args.calib_samples, args.probe_samples,
                                           args.calib_seq_len, model)
    s = Searcher(model, batches, bits=bits, group_size=args.group_size, base=args.base, probe_batches=probe,
                 scale_dtype=args.scale_dtype, progress=not args.quiet, rotate="hadamard" if args.rotate else None)
    budget_bytes = None if args.budget_mib is None else int(args.budget_mib * 2**20)
    res = s.run(args.strategy, budget_bits=args.budget_bits, budget_bytes=budget_bytes, lam=args.lam,
                max_evals=args.max_evals)
    shown = write_search_output(s, res, out, tokenizer=tok, model_name=args.model, budgets=budgets,
                                max_windows=args.max_windows, max_evals=args.max_evals, save_model=not args.no_save,
                                command=f"llmeasyquant {' '.join(sys.argv[1:])}", overwrite=args.overwrite,
                                progress=None if args.quiet else print)
    print("\n".join(shown))
    print(f"written to {out} (search.md, search.json, bitmap.json{', model/' if not args.no_save else ''}) "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import default_eval_file
    from .eval import model_memory, throughput
    from .eval.perplexity import perplexity, tokenize_file
    from .io import load_any

    text = args.text or default_eval_file()
    if not os.path.isfile(text):  # before loading a model for minutes
        raise FileNotFoundError(f"--text: no such file: {text}" if args.text else
                                f"WikiText-2 raw test not found at {text} (set LLMEQ_DATA_DIR, or pass --text FILE)")
    model, tok = load_any(args.model, trust_remote_code=args.trust_remote_code)
    want = {k for k in ("ppl", "memory", "speed") if getattr(args, k)} or {"ppl", "memory", "speed"}
    ids = tokenize_file(tok, text)
    cfg = getattr(model, "llmeq_config", None)
    print(f"{args.model}: {cfg.describe() if cfg is not None else 'float model'}")
    if "ppl" in want:
        r = perplexity(model, ids=ids, path=text, seq_len=args.seq_len,
                       max_windows=None if args.max_windows == 0 else args.max_windows, progress=not args.quiet)
        print(f"  perplexity {r.ppl:.3f}  ({r.protocol()})")
    if "memory" in want:
        m = model_memory(model)
        extra = (f"; plus {m['derived'] / 2**20:.1f} MiB of kernel layouts derived at run time (not saved)"
                 if m["derived"] else "")
        print(f"  memory: linear layers {m['linear'] / 2**20:.1f} MiB, whole model {m['total'] / 2**20:.1f} MiB"
              + extra)
    if "speed" in want:
        sp = throughput(model, ids, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
                        batch=args.batch)
        print(f"  speed: prefill {sp.prefill_tokens_per_s:.0f} tok/s ({sp.prefill_tokens} tokens), decode "
              f"{sp.decode_tokens_per_s:.1f} tok/s ({sp.decode_tokens} tokens; batch {sp.batch}, "
              f"{sp.threads} threads, {sp.device}; decode loop: {sp.decode_loop})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import llmeasyquant as lq

    if args.format is not None:
        if args.out is None:
            raise ValueError("export --format needs --out OUT (the folder to write)")
        from .io import check_save_destination

        check_save_destination(args.out, args.overwrite)  # before the load, not after it
        model, tok = lq.load(args.model_dir, with_tokenizer=True, trust_remote_code=args.trust_remote_code)
        out = lq.save(model, args.out, tokenizer=tok, overwrite=args.overwrite, format=args.format)
        n = sum(isinstance(m, lq.QLinear) for m in model.modules())
        print(f"wrote {out} ({args.format}, {n} quantized layers, the same integers and scales); "
              f"serve it with e.g. `vllm serve {out}`, read it back with llmeasyquant.load({out!r})")
        return 0
    if args.out is not None:
        raise ValueError("export --out goes with --format; ONNX output is named by --onnx FILE")
    from llmeasyquant.onnx_export import check_against_torch, export_onnx

    model, tok = lq.load(args.model_dir, with_tokenizer=True, trust_remote_code=args.trust_remote_code)
    t0 = time.perf_counter()
    export_onnx(model, args.onnx, seq_len=args.seq_len)
    check = check_against_torch(model, tok, args.onnx, seq_len=args.seq_len)
    print(f"exported {args.onnx} ({os.path.getsize(args.onnx) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; "
          f"ONNX Runtime vs PyTorch on {check.tokens} tokens: max |logit diff| = {check.max_abs_diff:.2e}")
    return 0


def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what} (an integer >= {lo}), got {v}")
        return v
    return parse


WINDOWS = _int_at_least(0, "a window count, 0 for the whole file")
SEQ_LEN = _int_at_least(2, "tokens per window")
COUNT = _int_at_least(1, "a count")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmeasyquant", description="Quantization toolkit for LLMs.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="log decisions and timings (calibration, methods, search, ranks) to stderr")
    # commands that read a model: Python shipped inside a model folder runs only when asked
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust-remote-code", action="store_true",
                       help="allow a model folder's own Python code (config.json auto_map) to run; off by default")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", parents=[common, trust], help="show how this installation was built",
                       description="Show version, the torch it was built against, CUDA and CPU kernels; "
                                   "with --arch, what llmeasyquant finds in a model instead.",
                       epilog="example: llmeasyquant info")
    s.add_argument("--arch", metavar="MODEL", default=None,
                   help="show the architecture llmeasyquant finds in MODEL (local HF folder, .gguf, saved "
                        "quantized folder or 'smollm2-135m'): decoder blocks, linears, scale groups declared "
                        "and discovered, fused projections")
    s.set_defaults(fn=_cmd_info)
    s = sub.add_parser("demo", parents=[common, trust], help="quantize one real layer of a model with QLinear and compare",
                       description="Swap one MLP projection of a real model for QLinear (W8A8 dynamic, "
                                   "W8A16, W4A16) and report error, next-token agreement, bytes and speed.",
                       epilog="example: llmeasyquant demo --layer 3 --proj down_proj")
    s.add_argument("--model", default="smollm2-135m",
                   help="local HF folder, .gguf file, or the embedded default 'smollm2-135m'")
    s.add_argument("--text", default=None, help="text file the layer input comes from (default: WikiText-2 validation)")
    s.add_argument("--tokens", type=int, default=512, help="tokens of text to run (default 512)")
    s.add_argument("--layer", type=int, default=3, help="decoder layer index (default 3)")
    s.add_argument("--proj", default="down_proj", choices=["gate_proj", "up_proj", "down_proj"])
    s.add_argument("--reps", type=int, default=20, help="timing repetitions (median)")
    s.set_defaults(fn=_cmd_demo)

    from .compare import METHOD_SETS, PRESETS

    s = sub.add_parser("compare", parents=[common, trust], help="compare quantization methods on a model (perplexity, memory, tokens/s)",
                       description="Quantize a fresh copy of the model with each method preset, evaluate "
                                   "WikiText-2 perplexity (non-overlapping windows of the raw test file), bytes "
                                   "held by the linear layers and the whole model, and prefill/decode tokens/s; "
                                   "print one table and write it as Markdown, CSV and JSON.",
                       epilog="example: llmeasyquant compare smollm2-135m --methods default --max-windows 8 "
                              "--out results")
    s.add_argument("model", nargs="?", default="smollm2-135m",
                   help="local HF folder, .gguf file, or the embedded default 'smollm2-135m'")
    s.add_argument("--methods", default="default",
                   help=f"a set ({', '.join(f'{k}: {len(v)} presets' for k, v in METHOD_SETS.items())}) or "
                        f"comma-separated presets: {', '.join(PRESETS)}")
    s.add_argument("--max-windows", type=WINDOWS, default=16,
                   help="evaluate the first N windows of the test file (0 = the whole file; default 16)")
    s.add_argument("--seq-len", type=SEQ_LEN, default=2048, help="tokens per perplexity window (default 2048)")
    s.add_argument("--text", action="append", metavar="NAME=FILE",
                   help="also score every model on this text (repeatable): perplexity and Δ%% columns named "
                        "NAME, the same window count; how methods calibrated on WikiText do on other text")
    s.add_argument("--calib-samples", type=COUNT, default=128, help="calibration sequences (default 128)")
    s.add_argument("--calib-seq-len", type=SEQ_LEN, default=512, help="tokens per calibration sequence (default 512)")
    s.add_argument("--out", default=None, help="folder for compare.md/.csv/.json (rewritten after each method)")
    s.add_argument("--resume", action="store_true", help="skip presets already in OUT/compare.json (same protocol)")
    s.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurement")
    s.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_compare)

    from .methods.base import available_methods

    s = sub.add_parser("quantize", parents=[common, trust], help="quantize a model with one method and save it",
                       description="Quantize a model with a method (calibrated on WikiText-2 validation unless "
                                   "--calib is given) and save it as a self-contained folder (safetensors).",
                       epilog="example: llmeasyquant quantize smollm2-135m --method awq --w-bits 4 "
                              "--w-group-size 64 --out smollm2-awq")
    s.add_argument("model", nargs="?", default="smollm2-135m",
                   help="local HF folder, .gguf file, or the embedded default 'smollm2-135m'")
    s.add_argument("--method", required=True, choices=available_methods())
    s.add_argument("--w-bits", type=int, choices=[2, 3, 4, 8], default=None, help="weight bits (method default)")
    s.add_argument("--w-group-size", type=int, default=None, help="-1 per channel, g > 0 group-wise")
    s.add_argument("--act", choices=["none", "dynamic", "static", "ema"], default=None,
                   help="activation quantization (none = weight-only)")
    s.add_argument("--w-scale-dtype", choices=["float32", "float16"], default=None,
                   help="dtype of the weight scales held (method default: float32; mixed: float16)")
    s.add_argument("--calib", default=None,
                   help="calibration text file, or 'generated': text the float model samples itself (no data "
                        "needed; ./generated for a file of that name) (default: WikiText-2 validation)")
    s.add_argument("--calib-samples", type=COUNT, default=None, help="calibration sequences (method default)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the method's config, e.g. --option iters=80 (autoround), "
                        "--option damp=0.02 (gptq); VALUE is read as JSON (80, true, [0.4, 0.6]) or else as text; "
                        "repeatable; python -c 'import llmeasyquant as lq; print(lq.config_for(\"gptq\"))' lists them")
    s.add_argument("--lm-head", choices=["float", "w8", "method"], default="float",
                   help="the output head: float (default, the method's exclude), w8 (8-bit weights in groups "
                        "of 64, float activations, like llama.cpp Q8_0's output matrix: faster decode, perplexity "
                        "within noise of the float head on the default model, docs/results.md) or method "
                        "(quantized by the method itself, in its layer format)")
    s.add_argument("--out", required=True,
                   help="output folder (created; an existing llmeasyquant model folder is replaced atomically)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is a folder of other files (never a file or the current folder)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    d = s.add_argument_group("distributed (start the ranks with torchrun --no-python llmeasyquant quantize "
                             "--distributed ..., or torchrun -m llmeasyquant.distributed quantize ...)")
    d.add_argument("--distributed", action="store_true",
                   help="split the work over the torchrun ranks; rank 0 saves the (identical) model")
    d.add_argument("--data-parallel", action="store_true",
                   help="each rank calibrates on 1/P of the data, statistics combined (default: every rank "
                        "runs all calibration data, bit-identical to one process)")
    d.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl on CUDA, gloo (TCP) on CPU")
    d.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="distributed: where the ranks run (default: cuda when present); one process: where each "
                        "decoder block is calibrated and quantized, one block at a time, while the model stays on "
                        "the CPU (default: cpu)")
    d.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective waits for a stuck rank before failing (default 300)")
    d.add_argument("--breakdown", default=None, help="write the per-layer time breakdown (Markdown) here")
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("bench", parents=[common], help="QLinear and op microbenchmarks against fp32, torch.ao and torch._int_mm (CPU)",
                       description="Time QLinear (W8A8 dynamic, W8A16, W4A16) against fp32 F.linear, torch.ao dynamic "
                                   "quantization and torch._int_mm on layer shapes, each checked for correctness "
                                   "first; --ops adds the ops alone. CPU timing is noisy: ratios come from one run "
                                   "with interleaved rounds, the spread is shown.",
                       epilog="example: llmeasyquant bench --shapes smollm2 --tokens 1,16 --ops")
    add_bench_arguments(s)
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("search", parents=[common, trust], help="per-layer mixed-precision bit-width search under a size budget",
                       description="Choose a weight bit width (default candidates 2, 3, 4, 8) for every linear "
                                   "layer, minimising the calibration loss under a budget (bits per weight or "
                                   "MiB, scales and zero-points counted) or loss + lam x MiB. Writes the bit map, "
                                   "a report with plots and the quantized model to --out; --pareto adds the "
                                   "size/perplexity table across budgets against uniform settings.",
                       epilog="example: llmeasyquant search smollm2-135m --budget-bits 4 --base gptq "
                              "--pareto 3.5,4,4.5,5 --out smollm2-mixed")
    s.add_argument("model", nargs="?", default="smollm2-135m",
                   help="local HF folder, .gguf file, or the embedded default 'smollm2-135m'")
    b = s.add_mutually_exclusive_group()
    b.add_argument("--budget-bits", type=float, default=None, help="average bits per weight (metadata included)")
    b.add_argument("--budget-mib", type=float, default=None, help="MiB held by the quantized layers")
    b.add_argument("--lam", type=float, default=None, help="no budget: minimise loss + LAM x MiB")
    s.add_argument("--strategy", choices=["greedy", "entropy", "grid"], default="greedy",
                   help="greedy: measured coordinate descent (default); entropy: statistics only; grid: "
                        "exhaustive per projection type")
    s.add_argument("--base", choices=["rtn", "gptq"], default="rtn", help="quantizer of every candidate")
    s.add_argument("--bits", default="2,3,4,8", help="candidate bit widths (default 2,3,4,8)")
    s.add_argument("--rotate", action="store_true",
                   help="Hadamard-rotate the model before building the candidates (pays with --base gptq; "
                        "docs/results.md)")
    s.add_argument("--group-size", type=int, default=64, help="group size of the 2/3/4-bit candidates (default 64)")
    s.add_argument("--scale-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype the candidates hold their scales in (default float16: 0.25 bits per weight less "
                        "than float32 at group 64)")
    s.add_argument("--calib", default=None,
                   help="calibration text file, or 'generated' (text the float model samples itself) "
                        "(default: WikiText-2 validation)")
    s.add_argument("--calib-samples", type=int, default=16,
                   help="calibration sequences for the candidates (GPTQ Hessians; default 16)")
    s.add_argument("--probe-samples", type=int, default=4,
                   help="held-out sequences (another seed) on which assignments are measured (default 4)")
    s.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    s.add_argument("--max-evals", type=int, default=60, help="greedy: loss evaluations at most (default 60)")
    s.add_argument("--pareto", default=None, help="also evaluate these budgets (bits per weight, comma-separated)")
    s.add_argument("--max-windows", type=COUNT, default=16, help="perplexity windows for --pareto (default 16)")
    s.add_argument("--out", required=True,
                   help="output folder (created; an earlier search output is replaced atomically)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is a folder of other files (never a file or the current folder)")
    s.add_argument("--no-save", action="store_true", help="do not write the quantized model")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_search)

    s = sub.add_parser("eval", parents=[common, trust], help="perplexity, memory and tokens/s of a model or a saved quantized folder",
                       description="Evaluate a model (local HF folder, .gguf, 'smollm2-135m') or a folder written "
                                   "by `llmeasyquant quantize`: perplexity (WikiText-2 raw test, or --text FILE), "
                                   "bytes held, tokens/s (all three unless some are named).",
                       epilog="example: llmeasyquant eval smollm2-awq --ppl --max-windows 8")
    s.add_argument("model", help="model or saved quantized folder")
    s.add_argument("--ppl", action="store_true", help="perplexity (on --text)")
    s.add_argument("--text", default=None,
                   help="text file for perplexity and the speed prompt (default: WikiText-2 raw test)")
    s.add_argument("--memory", action="store_true", help="bytes held by the linear layers and the model")
    s.add_argument("--speed", action="store_true", help="prefill / decode tokens per second")
    s.add_argument("--prefill-tokens", type=COUNT, default=512, help="speed: tokens per prefill forward (default 512)")
    s.add_argument("--decode-tokens", type=COUNT, default=32,
                   help="speed: greedy tokens decoded after a 64-token prompt (default 32)")
    s.add_argument("--batch", type=COUNT, default=1, help="speed: sequences run together (default 1)")
    s.add_argument("--max-windows", type=WINDOWS, default=16, help="perplexity windows (0 = whole file; default 16)")
    s.add_argument("--seq-len", type=SEQ_LEN, default=2048, help="tokens per window (default 2048)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("export", parents=[common, trust],
                       help="export a saved quantized model to ONNX, compressed-tensors, GPTQ or AWQ",
                       description="Export a folder written by `llmeasyquant quantize` (or llmeasyquant.save) to "
                                   "ONNX opset 21 (QuantizeLinear/MatMulInteger for W8A8, DequantizeLinear for "
                                   "weight-only, INT4 initializers for 4-bit) and compare ONNX Runtime's logits "
                                   "with PyTorch's (--onnx FILE), or rewrite it as a compressed-tensors or GPTQ "
                                   "(or AWQ GEMM) folder for vLLM / SGLang / TGI / transformers (--format F --out DIR: the same "
                                   "integers and scales, bit for bit).",
                       epilog="example: llmeasyquant export smollm2-awq --format gptq --out smollm2-awq-gptq")
    s.add_argument("model_dir", help="folder written by llmeasyquant quantize / llmeasyquant.save")
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", help="output .onnx file")
    target.add_argument("--format", choices=("compressed-tensors", "gptq", "awq"),
                        help="checkpoint format of the output folder (needs --out)")
    s.add_argument("--out", help="output folder for --format")
    s.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is not an llmeasyquant output")
    s.add_argument("--seq-len", type=COUNT, default=None, help="fixed sequence length (default: dynamic)")
    s.set_defaults(fn=_cmd_export)
    return p


def _exit_on_sigterm() -> None:
    """SIGTERM (kill, a scheduler's timeout) as SystemExit, so the commands'
    cleanup runs (temporary output folders removed, nothing half-written)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    from .distributed.runtime import LaunchError, PeerFailure

    args = build_parser().parse_args(argv)
    from .log import configure

    configure(verbose=args.verbose)
    _exit_on_sigterm()
    try:
        return args.fn(args)
    except (OSError, ValueError, ImportError, LaunchError, PeerFailure) as err:
        # one line, no traceback (-v keeps the traceback for bug reports)
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"llmeasyquant {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
