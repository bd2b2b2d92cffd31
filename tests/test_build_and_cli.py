"""build_info, the CLI, and that the benchmark scripts still run (CI touches them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ISA_CHAINS, lq

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_reports_what_was_built():
    info = lq.build_info()
    assert info["version"] == lq.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_isa_detected"] in ISA_CHAINS[0] + ISA_CHAINS[1]
    assert info["cpu_isa_detected"] in info["cpu_kernels_compiled"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert "80" in info["cuda_archs"] and "90a" in info["cuda_archs"]
    assert info["openmp"] is True


def test_isa_cap_from_environment(monkeypatch):
    monkeypatch.setenv("LLMEQ_CPU_ISA", "scalar")
    assert lq.build_info()["cpu_isa_active"] == "scalar"


def test_isa_cap_of_the_other_architecture_is_scalar(monkeypatch):
    """A tier of the other chain caps to scalar (the one tier both share); an
    unknown name is no cap (cpu_kernels.h)."""
    best = lq.build_info()["cpu_isa_detected"]
    other = "neon" if best in ISA_CHAINS[0][1:] else "avx2" if best in ISA_CHAINS[1][1:] else None
    if other is not None:
        monkeypatch.setenv("LLMEQ_CPU_ISA", other)
        assert lq.build_info()["cpu_isa_active"] == "scalar"
    monkeypatch.setenv("LLMEQ_CPU_ISA", "no_such_tier")
    assert lq.build_info()["cpu_isa_active"] == best


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llmeasyquant.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_info():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    assert "built against torch" in r.stdout and "CPU kernels" in r.stdout
    assert f"in use: {lq.build_info()['cpu_isa_active']}" in r.stdout  # the tier in use is named


def test_cli_help_and_bad_arguments():
    for args in (["--help"], ["info", "--help"], ["demo", "--help"]):
        r = _cli(*args)
        assert r.returncode == 0 and "usage: llmeasyquant" in r.stdout
    r = _cli("demo", "--proj", "q_proj")
    assert r.returncode == 2 and "invalid choice: 'q_proj'" in r.stderr
    r = _cli("demo", "--text", "/nonexistent/file.txt")
    assert r.returncode == 2 and "text file not found" in r.stderr


def test_cli_demo_on_default_model():
    r = _cli("demo", "--tokens", "64", "--reps", "2")
    assert r.returncode == 0, r.stderr
    assert "W8A8 dynamic" in r.stdout and "W4A16 g64" in r.stdout


def test_bench_qlinear_runs(tmp_path):
    # the caller's PYTHONPATH kept: the script must import the llmeasyquant under test, not an installed one
    paths = [str(ROOT / "benchmarks")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_qlinear.py"), "--shapes", "quick",
                        "--tokens", "1,16", "--reps", "2", "--rounds", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "| 256x384 | 16 |" in r.stdout


def test_bench_qlinear_docs_keep_one_table_per_isa(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_qlinear", ROOT / "benchmarks" / "bench_qlinear.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro\n")
    script.write_docs("| avx512 v1 |", "h", docs, "avx512_vnni")
    script.write_docs("| avx2 v1 |", "h", docs, "avx2")
    script.write_docs("| avx2 v2 |", "h", docs, "avx2")  # replaces its own block only
    text = docs.read_text()
    assert "intro" in text and "| avx512 v1 |" in text and "| avx2 v2 |" in text
    assert "| avx2 v1 |" not in text and text.count("<!-- bench_qlinear:avx2:begin -->") == 1


def test_bench_command_times_and_checks(capsys):
    from llmeasyquant import cli

    assert cli.main(["bench", "--shapes", "quick", "--tokens", "1,3", "--reps", "2", "--rounds", "1", "--ops",
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 256x384 | 3 |" in out and "Ops alone" in out and "int8 GEMM (int32 out)" in out
    assert cli.main(["bench", "--shapes", "quick", "--tokens", "0"]) == 2
    assert "positive token counts" in capsys.readouterr().err


def test_bench_run_takes_typed_arguments(capsys):
    from llmeasyquant import bench

    n = torch.get_num_threads()
    try:
        header, table = bench.run(threads=1, reps=1, rounds=1, shapes=[(64, 128)], tokens=[2], ops=True,
                                  command="typed")
        assert "| 64x128 | 2 |" in table and "Ops alone" in table
        assert "1 threads" in header and "command: `typed`" in header and "median of 1 runs" in header
        assert "N=64 K=128 M=2:" in capsys.readouterr().out  # progress, one line per point
        for kw, msg in ((dict(tokens="1,x"), "tokens: expected comma-separated integers, got '1,x'"),
                        (dict(tokens=[0]), r"tokens: expected positive token counts, got \[0\]"),
                        (dict(shapes="nope"), "shapes: expected one of all, gpt2, llama, quick, smollm2"),
                        (dict(shapes=[(64,)]), r"shapes: expected \(N, K\) pairs"),
                        (dict(reps=0), "reps: expected an integer >= 1, got 0")):
            with pytest.raises(ValueError, match=msg):
                bench.run(**{"shapes": "quick", "tokens": [1], **kw})
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("command", ["info", "bench", "compare", "quantize", "search", "eval", "export", "demo"])
def test_every_command_has_help(command, capsys):
    from llmeasyquant import cli

    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llmeasyquant " + command) and "example" in out or command == "info"


def test_bad_choice_is_a_one_line_error_with_the_choices(capsys):
    from llmeasyquant import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--method", "magic", "--out", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'magic'" in err and "gptq" in err


def test_quantize_method_options(tmp_path, capsys):
    from llmeasyquant import cli
    from llmeasyquant.methods.base import config_for

    opts = cli.method_options(["iters=80", "clip=false", "lr=0.01", "exclude=[\"lm_head\"]"])
    assert opts == {"iters": 80, "clip": False, "lr": 0.01, "exclude": ["lm_head"]}
    cfg = config_for("autoround", **opts)
    assert cfg.iters == 80 and cfg.clip is False and cfg.exclude == ("lm_head",)
    assert cli.method_options(["base=gptq"]) == {"base": "gptq"}  # not JSON: the text itself
    # checked before any model is loaded or folder written
    out = tmp_path / "never"
    assert cli.main(["quantize", "--method", "autoround", "--option", "itres=80", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['itres']" in err and "iters" in err and not out.exists()
    assert cli.main(["quantize", "--method", "gptq", "--option", "damp", "--out", str(out)]) == 2
    assert "expected KEY=VALUE, got 'damp'" in capsys.readouterr().err


def test_sigterm_runs_the_commands_cleanup(tmp_path):
    # a killed search/compare/quantize must not leave its temporary output folder behind
    code = f"""
import os, shutil, signal, sys, tempfile, time
from llmeasyquant.cli import _exit_on_sigterm
_exit_on_sigterm()
tmp = tempfile.mkdtemp(dir={str(tmp_path)!r})
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
except BaseException:
    shutil.rmtree(tmp)
    raise
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + 15, r.stderr
    assert os.listdir(tmp_path) == []


def test_throughput_batch_and_tokens(one_thread):
    import tiny_models
    from llmeasyquant.eval import throughput

    model = tiny_models.build("llama")
    ids = torch.randint(0, tiny_models.VOCAB, (300,))
    sp = throughput(model, ids, prefill_tokens=16, decode_tokens=3, reps=1, batch=2, warmup=False)
    assert sp.batch == 2 and sp.prefill_tokens_per_s > 0 and sp.decode_tokens_per_s > 0
    short = ids[:128].reshape(2, 64)
    want = model.generate(short, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(short))[:, 64:]
    assert sp.generated == want.tolist() and "generated" not in sp.to_dict()
    with pytest.raises(ValueError, match=r"need at least 1024 token ids \(batch 8 x 128\), got 300"):
        throughput(model, ids, prefill_tokens=128, batch=8)


def test_bench_e2e_fails_clearly_without_its_prepared_inputs(tmp_path):
    not_gguf = tmp_path / "q4.gguf"
    not_gguf.write_bytes(b"nope")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e_cpu.py"),
                        "--bench-python", str(tmp_path / "venv" / "bin" / "python"),
                        "--gguf-q8", str(tmp_path / "missing.gguf"), "--gguf-q4", str(not_gguf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "missing prepared inputs" in r.stderr and "nothing is downloaded" in r.stderr
    assert "--bench-python" in r.stderr and "missing.gguf: no such file" in r.stderr
    assert "q4.gguf: not a GGUF file" in r.stderr


def test_quantize_lm_head_flag(tmp_path, monkeypatch):
    """--lm-head: float keeps the method's exclude list; method drops lm_head
    from it (the head in the method's layer format); w8 makes it an 8-bit
    weight-only layer after the method. The saved folder says so."""
    import llmeasyquant.models
    import tiny_models
    from llmeasyquant import cli

    built = {}

    def fake_load(path, trust_remote_code=False):
        built["model"] = tiny_models.build("llama")
        return built["model"], None

    monkeypatch.setattr(llmeasyquant.models, "load_model", fake_load)
    for mode, act in (("float", None), ("method", "dynamic"), ("w8", None)):
        out = tmp_path / mode
        assert cli.main(["quantize", "tiny", "--method", "absmax", "--act", "dynamic", "--quiet", "--out", str(out),
                         "--lm-head", mode]) == 0
        model, loaded = built["model"], lq.load(out)
        for m in (model, loaded):
            assert isinstance(m.lm_head, lq.QLinear) is (mode != "float")
            if mode != "float":
                assert m.lm_head.act == act and m.lm_head.w_bits == 8
            assert ("lm_head" in m.llmeq_config.exclude) is (mode != "method")
            assert m.llmeq_config.lm_head == (mode if mode == "w8" else None)


def test_bench_decode_call_runs():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_call.py"), "--rounds", "1",
                        "--calls", "2", "--shapes", "64x64"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| QLinear() W8A8 dynamic |" in r.stdout and "| QLinear() W4 g64 |" in r.stdout
    assert "| QLinear.bound_forward() W8A8 |" in r.stdout


def test_bench_decode_gemv_runs():
    # (2 MB instead of the 100+ that make it a DRAM measurement: this only checks that it runs)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_gemv.py"), "--rounds", "1",
                        "--mbytes", "2", "--k", "576", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| W8A8 dynamic (int8 GEMV) |" in r.stdout and "| float sum (ceiling) |" in r.stdout
