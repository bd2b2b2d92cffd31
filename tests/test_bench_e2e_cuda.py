"""benchmarks/bench_e2e_cuda.py (issue 16 item 5) runs end to end: its CPU dry
run on a tiny random LLaMA (the GPU run is scripts/gpu_check.sh's)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e_cuda", ROOT / "benchmarks" / "bench_e2e_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_times_every_method_and_checks_agreement(tmp_path, one_thread):
    out = tmp_path / "e2e.md"
    assert _bench().main(["--model", "tiny", "--device", "cpu", "--decode", "2", "--prefill", "16",
                          "--batches", "1", "--reps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| bf16") or line.startswith("| W")]
    assert [r.split("|")[1].strip() for r in rows] == ["bf16", "W8A8", "W4A16"]
    assert "100.0 %" in rows[0]  # the float model agrees with itself
    for r in rows[1:]:  # quantized models mostly agree with the float one
        assert float(r.split("|")[8].strip().rstrip(" %")) >= 50.0, r


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        _bench()._args(["--methods", "bf16,W3A3", "--device", "cpu"])
