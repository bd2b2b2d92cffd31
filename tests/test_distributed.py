"""Distributed quantization on real torch.distributed process groups: 2 and 4
gloo ranks on 127.0.0.1, spawned by the test (bounded in time, reaped on
failure). NCCL variants need 2+ GPUs (marked multi_gpu; skipped otherwise)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import llmeasyquant.distributed as lqd  # noqa: E402
from llmeasyquant.distributed.local import run_local  # noqa: E402

import dist_workers as W  # noqa: E402

TIMEOUT = 240

# (method, options): every calibrated method and the RTN family
METHODS = [
    ("absmax", {}),
    ("zeropoint", {"w_bits": 4, "w_group_size": 16, "act": None}),
    ("absmax", {"act": "static"}),
    ("smoothquant", {"n_calib": 8}),
    ("gptq", {"w_group_size": 16}),
    ("awq", {"w_group_size": 16, "grid": 5}),
]


def _single(arch, method, options):
    return run_local(W.quantize_single, 1, arch, method, options, timeout_s=TIMEOUT).ordered()[0]


@pytest.mark.parametrize("method,options", METHODS, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in METHODS])
def test_sharded_is_bit_identical_to_one_process(method, options):
    ref = _single("llama", method, options)
    out = run_local(W.quantize_sharded, 2, "llama", method, options, False, timeout_s=TIMEOUT).ordered()
    for rank, o in enumerate(out):
        diff = [k for k in ref if o["digests"].get(k) != ref[k]]
        assert not diff, f"rank {rank} differs from the single-process run in {diff[:5]}"
    # the work was split: both ranks quantized something and sent it
    assert all(o["sent"] > 0 for o in out)
    assert all(o["totals"]["quant"] > 0 for o in out)


def test_four_ranks_gptq_bit_identical():
    ref = _single("llama", "gptq", {"w_group_size": 16})
    out = run_local(W.quantize_sharded, 4, "llama", "gptq", {"w_group_size": 16}, False, timeout_s=TIMEOUT).ordered()
    assert all(o["digests"] == ref for o in out)


@pytest.mark.parametrize("arch", ["opt", "gpt2", "mixtral"])  # mixtral: per-expert linears over the ranks
def test_sharded_other_architectures(arch):
    ref = _single(arch, "gptq", {"w_group_size": 16})
    out = run_local(W.quantize_sharded, 2, arch, "gptq", {"w_group_size": 16}, False, timeout_s=TIMEOUT).ordered()
    assert all(o["digests"] == ref for o in out)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_statistics_equal_one_process(world):
    out = run_local(W.stats_data_parallel, world, timeout_s=TIMEOUT).ordered()
    for rank, same in enumerate(out):
        assert all(same.values()), f"rank {rank}: stats differ for {[p for p, ok in same.items() if not ok]}"


def test_data_parallel_static_absmax_bit_identical():
    # max/min reductions are exact, so data-parallel calibration changes nothing
    ref = _single("llama", "absmax", {"act": "static"})
    out = run_local(W.quantize_sharded, 2, "llama", "absmax", {"act": "static"}, True, timeout_s=TIMEOUT).ordered()
    assert all(o["digests"] == ref for o in out)


def test_data_parallel_gptq_close_to_one_process():
    # Hessian sums differ from one process only in float64 summation order
    ref_run = run_local(W.quantize_sharded, 1, "llama", "gptq", {"w_group_size": 16}, False, timeout_s=TIMEOUT)
    ref = ref_run.ordered()[0]["state"]
    out = run_local(W.quantize_sharded, 2, "llama", "gptq", {"w_group_size": 16}, True, timeout_s=TIMEOUT).ordered()
    assert out[0]["digests"] == out[1]["digests"]  # ranks agree exactly
    for k, v in ref.items():
        if k.endswith("qweight"):
            same = (out[0]["state"][k] == v).float().mean().item()
            assert same > 0.99, f"{k}: only {same:.3%} of the packed weights equal the one-process run"
        elif v.is_floating_point():
            torch.testing.assert_close(out[0]["state"][k], v, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_qlinear_matches_single_device(world):
    out = run_local(W.tensor_parallel_layers, world, timeout_s=TIMEOUT).ordered()
    assert len(out[0]) == 2 * len(W.TP_CASES)
    for rank, cases in enumerate(out):
        for case, (col_err, row_err, scale) in cases.items():
            assert col_err == 0.0, f"rank {rank} {case}: column-parallel output must equal the unsharded one exactly"
            assert row_err <= 1e-5 * scale + 1e-6, f"rank {rank} {case}: row-parallel error {row_err} (scale {scale})"


@pytest.mark.parametrize("act,w_bits,group", [("dynamic", 8, -1), (None, 4, 16)])
def test_tensor_parallel_block_matches_single_device(act, w_bits, group):
    out = run_local(W.tensor_parallel_block, 2, act, w_bits, group, timeout_s=TIMEOUT).ordered()
    for err, scale in out:
        assert err <= 1e-5 * scale + 1e-6, f"TP block error {err} (output scale {scale})"


def test_tensor_parallel_rejects_indivisible_and_unknown():
    import llmeasyquant as lq
    from llmeasyquant.distributed import tensor_parallel as tp

    ql = lq.QLinear.from_linear(torch.nn.Linear(30, 10))
    with pytest.raises(ValueError, match="divisible by 4"):
        tp.RowParallelQLinear.from_qlinear(ql, 0, 4)
    with pytest.raises(ValueError, match="group boundaries"):
        tp.RowParallelQLinear.from_qlinear(lq.QLinear.from_linear(torch.nn.Linear(64, 8), w_bits=4,
                                                                  w_group_size=32, act=None), 1, 4)
    with pytest.raises(ValueError, match="no layout for model type 'gpt2'"):
        tp.shard_block(torch.nn.Module(), "gpt2", 0, 2)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_ema_scales_consistent_across_ranks(mode):
    out = run_local(W.ema_sync, 2, 3, mode, timeout_s=TIMEOUT).ordered()
    assert all(o["equal_after"] for o in out)
    # before the first sync the ranks really had different scales
    assert not torch.equal(out[0]["before"], out[1]["before"])
    assert all(o["syncs"] == 2 for o in out)


def test_dead_rank_fails_the_others_quickly():
    run = run_local(W.dies_midway, 2, timeout_s=120, pg_timeout_s=30)
    assert 1 in run.errors and "code 3" in run.errors[1]
    assert 0 in run.results, f"rank 0 should report a PeerFailure, got {run.errors.get(0)}"
    r0 = run.result(0)
    assert r0["error"] is not None and "another rank probably died" in r0["error"], r0
    assert r0["seconds"] < 60


def test_partition_is_balanced_and_deterministic():
    owner = lqd.partition(["a", "b", "c", "d", "e"], [5, 4, 3, 2, 1], 2)
    assert owner == lqd.partition(["a", "b", "c", "d", "e"], [5, 4, 3, 2, 1], 2)
    loads = [sum(c for k, c in zip("abcde", [5, 4, 3, 2, 1]) if owner[k] == r) for r in range(2)]
    assert max(loads) - min(loads) <= 1


def test_backend_choice_and_errors(monkeypatch):
    assert lqd.pick_backend("auto", "cpu") == "gloo"
    assert lqd.pick_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        lqd.pick_backend("mpi")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(lqd.LaunchError, match="torchrun"):
        lqd.init("gloo")


def test_breakdown_table_has_every_phase():
    t = lqd.Breakdown()
    with t.phase("model.layers.0.mlp.up_proj", "quant"):
        pass
    with t.phase("model.layers.0", "sync"):
        pass
    table = lqd.format_table(t.by_block("model.layers"))
    assert "model.layers.0" in table and "**all**" in table
    for p in lqd.PHASES:
        assert f"{p} s" in table
    with pytest.raises(ValueError, match="unknown phase"):
        with t.phase("x", "nap"):
            pass


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL")
def test_nccl_sharded_gptq_bit_identical():
    ref = _single("llama", "gptq", {"w_group_size": 16})
    out = run_local(W.quantize_sharded, 2, "llama", "gptq", {"w_group_size": 16}, False, timeout_s=TIMEOUT,
                    backend="nccl").ordered()
    assert all(o["digests"] == ref for o in out)


def test_torchrun_cli_quantize_matches_one_process(tmp_path):
    """`torchrun -m llmeasyquant.distributed quantize` end to end: 2 gloo ranks,
    rank 0 saves; the saved model equals a one-process quantization."""
    import subprocess

    import llmeasyquant as lq
    import tiny_models

    src = tmp_path / "tiny"
    tiny_models.build("llama").save_pretrained(src)
    tiny_models.byte_tokenizer().save_pretrained(src)
    calib = tmp_path / "calib.txt"
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2",
                           "wiki.valid.tokens")) as fh:
        calib.write_text(fh.read(20000))
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llmeasyquant.distributed", "quantize", str(src), "--method", "gptq", "--w-group-size", "16",
           "--calib", str(calib), "--calib-samples", "4", "--out", str(out), "--breakdown",
           str(tmp_path / "bd.md"), "--timeout", "60", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identical on every rank" in r.stdout
    table = (tmp_path / "bd.md").read_text()
    assert "| rank |" in table and "model.layers.1" in table
    saved = lq.load(str(out))

    from llmeasyquant.models import load_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with one thread each: same float summation order
    try:
        model, tok = load_model(str(src))
        lq.quantize(model, "gptq", calib=str(calib), tokenizer=tok, progress=False, w_group_size=16, n_calib=4)
    finally:
        torch.set_num_threads(n)
    assert lqd.model_digests(saved) == lqd.model_digests(model)


def test_quantize_distributed_typed_returns_the_report_on_rank_0(tmp_path):
    import llmeasyquant as lq
    import tiny_models

    src = tmp_path / "tiny"
    tiny_models.build("llama").save_pretrained(src)
    tiny_models.byte_tokenizer().save_pretrained(src)
    out, bd = tmp_path / "q", tmp_path / "bd.md"
    reports = run_local(W.quantize_command, 2, str(src), str(out), str(bd), timeout_s=TIMEOUT).ordered()
    assert reports[1] is None  # only rank 0 saves and reports
    assert reports[0].startswith("absmax W8 A8 dynamic on 2 rank(s) (gloo, cpu, replicated calibration): ")
    assert reports[0].endswith(bd.read_text().rstrip("\n")) and f"saved to {out}" in reports[0]
    assert lq.load(str(out)).llmeq_config.method == "absmax"


def test_distributed_entry_point_usage():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "llmeasyquant.distributed"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "torchrun --nproc_per_node" in r.stderr
    # not started by torchrun: one clear line, no traceback
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "llmeasyquant.cli", "quantize", "--method", "absmax", "--distributed",
                        "--out", "/nonexistent/x"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "RANK is not set" in r.stderr and "Traceback" not in r.stderr


def test_ranks_with_different_options_refuse_at_start():
    out = run_local(W.quantize_mismatched, 2, timeout_s=TIMEOUT).ordered()
    for o in out:
        assert o["error"] is not None and "different settings" in o["error"] and "method and options" in o["error"]


def test_stopped_rank_is_killed_soon_after_another_fails():
    import time

    t0 = time.perf_counter()
    run = run_local(W.fails_while_peer_stopped, 2, timeout_s=300, grace_s=3)
    elapsed = time.perf_counter() - t0
    assert "rank 0 gave up" in run.errors[0]
    assert "killed" in run.errors[1] and "after rank(s) [0] failed" in run.errors[1]
    assert elapsed < 120, f"the launcher waited {elapsed:.0f} s for a stopped rank"
