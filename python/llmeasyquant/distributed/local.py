"""Start P ranks on this machine (127.0.0.1) without torchrun: for tests,
benchmarks and notebooks. Each rank runs ``fn(rank, world, *args)`` in a
fresh process; results come back in rank order. Bounded in time: a rank that
does not finish in ``timeout_s`` gets every rank killed and a clear error; all
children are reaped whatever happens."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, results, args, threads, backend, pg_timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch

    from . import runtime

    torch.set_num_threads(threads)
    try:
        runtime.init(backend, device="cpu" if backend == "gloo" else None, timeout_s=pg_timeout_s)
        out = fn(rank, world, *args)
        # plain pickle: tensors travel as bytes, not as shared memory that dies with this process
        results.put((rank, True, pickle.dumps(out)))
    except BaseException as err:  # report everything, including KeyboardInterrupt
        results.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        try:
            runtime.shutdown()
        except Exception:
            pass


@dataclass
class LocalRun:
    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def result(self, rank: int):
        return pickle.loads(self.results[rank])

    def ordered(self) -> list:
        """Results in rank order; raises if any rank failed."""
        if self.errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(f"rank {r}: {e}"
                                                                       for r, e in sorted(self.errors.items())))
        return [pickle.loads(self.results[r]) for r in sorted(self.results)]


def run_local(fn: Callable, world: int, *args, timeout_s: float = 300.0, threads: int = 1,
              backend: str = "gloo", pg_timeout_s: float = 60.0, grace_s: float = 10.0) -> LocalRun:
    """Run ``fn(rank, world, *args)`` on ``world`` processes joined in one
    process group over loopback (``fn`` must be importable: a module-level function)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, results, args, threads, backend, pg_timeout_s),
                         daemon=True) for r in range(world)]
    run = LocalRun()
    t0 = time.perf_counter()
    first_error = None
    try:
        for p in procs:
            p.start()
        while len(run.results) + len(run.errors) < world:
            try:
                rank, ok, out = results.get(timeout=0.5)
                (run.results if ok else run.errors)[rank] = out
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                # died without reporting (killed, os._exit, segfault); give the queue a moment first
                if p.exitcode is not None and r not in run.results and r not in run.errors:
                    try:
                        rank, ok, out = results.get(timeout=2.0)
                        (run.results if ok else run.errors)[rank] = out
                    except queue.Empty:
                        run.errors[r] = f"process exited with code {p.exitcode} without reporting"
            if run.errors and first_error is None:
                first_error = time.perf_counter()
            # once a rank has failed, the others get a short grace to report
            # (their collectives fail fast on the dead peer's closed sockets);
            # one that is stopped or stuck is killed then, not at timeout_s
            if first_error is not None and time.perf_counter() - first_error > grace_s:
                failed = sorted(run.errors)
                for r in range(world):
                    if r not in run.results and r not in run.errors:
                        run.errors[r] = f"killed: still running {grace_s:.0f} s after rank(s) {failed} failed"
                break
            if time.perf_counter() - t0 > timeout_s:
                missing = [r for r in range(world) if r not in run.results and r not in run.errors]
                for r in missing:
                    run.errors[r] = f"no result after {timeout_s:.0f} s: killed"
                break
    finally:
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=0 if first_error is not None else 5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        run.seconds = time.perf_counter() - t0
    return run
