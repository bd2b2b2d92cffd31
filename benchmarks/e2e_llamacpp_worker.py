"""llama.cpp side of benchmarks/bench_e2e_cpu.py.  Runs in the *bench* venv
(llama-cpp-python; no torch, no llmeasyquant) as a child process, so the two
OpenMP runtimes never share a process, and is driven over stdin/stdout, one
JSON object per line, so its rounds interleave with ours.

Requests and replies:
  {"cmd": "load", "name": N, "path": P, "threads": T, "n_ctx": C}
      -> {"ok": true, "system_info": "...", "version": "..."}
  {"cmd": "check", "name": N, "ids": [...]}
      -> {"ok": true, "argmax": [...]}           next-token argmax at every position
  {"cmd": "round", "name": N, "prefill_ids": [...], "prompt_ids": [...], "decode": D}
      -> {"ok": true, "prefill_s": s, "decode_s": s, "tokens": [...]}
  {"cmd": "quit"}
Errors reply {"ok": false, "error": "..."}.

Prefill: one ``eval`` of the prefill ids from an empty cache (one micro-batch:
n_batch = n_ubatch >= its length).  Decode: greedy, one token per ``eval``
after the prompt, timed from the first decoded token to the last (the
prompt's prefill is not counted), the same quantity our side measures as
t(1 + D new tokens) - t(1 new token).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import llama_cpp

_models: dict = {}


def _load(req: dict) -> dict:
    n_ctx = int(req["n_ctx"])
    llm = llama_cpp.Llama(model_path=req["path"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          n_threads=int(req["threads"]), n_threads_batch=int(req["threads"]),
                          logits_all=False, verbose=False)
    _models[req["name"]] = llm
    # a second context over the same weights with every position's logits, for the check only
    _models[req["name"] + "/all"] = (req["path"], int(req["threads"]))
    info = llama_cpp.llama_print_system_info()
    return {"ok": True, "system_info": info.decode() if isinstance(info, bytes) else str(info),
            "version": llama_cpp.__version__}


def _last_argmax(llm) -> int:
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def _check(req: dict) -> dict:
    path, threads = _models[req["name"] + "/all"]
    ids = [int(t) for t in req["ids"]]
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(len(ids), 64), n_batch=len(ids), n_ubatch=len(ids),
                          n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    argmax = llm.scores[: len(ids)].argmax(axis=1).tolist()
    llm.close()
    return {"ok": True, "argmax": argmax}


def _round(req: dict) -> dict:
    llm = _models[req["name"]]
    prefill = [int(t) for t in req["prefill_ids"]]
    prompt = [int(t) for t in req["prompt_ids"]]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prefill)
    prefill_s = time.perf_counter() - t0
    llm.reset()
    llm.eval(prompt)
    tok = _last_argmax(llm)
    tokens = [tok]
    t0 = time.perf_counter()
    for _ in range(int(req["decode"])):
        llm.eval([tok])
        tok = _last_argmax(llm)
        tokens.append(tok)
    decode_s = time.perf_counter() - t0
    return {"ok": True, "prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens}


def main() -> int:
    # replies go to the original stdout; anything a C library prints lands on stderr
    reply = open(os.dup(1), "w")
    os.dup2(2, 1)
    handlers = {"load": _load, "check": _check, "round": _round}
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        try:
            rep = handlers[req["cmd"]](req)
        except Exception as e:  # reported to the driver, which fails with it
            rep = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(rep) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
