"""Saving never destroys what it did not write; a killed save is recovered by
the next save or load; CLI destinations are checked before any work (issue 14,
section 2)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import tiny_models
from conftest import lq


@pytest.fixture(scope="module")
def model():
    m = tiny_models.build("llama")
    lq.quantize(m, "absmax", progress=False)
    return m


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _listing(d):
    return sorted(os.listdir(d))


def test_empty_path_refused_and_cwd_untouched(model, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for bad in ("", "   ", ".", str(tmp_path), str(tmp_path.parent), "/"):
        with pytest.raises(ValueError, match="expected a folder path|current directory|filesystem root"):
            lq.save(model, bad)
    assert _listing(tmp_path) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_foreign_folder_kept_unless_overwrite(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not an llmeasyquant output.*overwrite=True"):
        lq.save(model, "~/mydocs")
    assert _listing(docs) == ["thesis.tex"]
    lq.save(model, "~/mydocs", overwrite=True)  # asked for explicitly
    assert "quantization.json" in _listing(docs) and "thesis.tex" not in _listing(docs)
    assert _listing(tmp_path) == ["mydocs"]


def test_file_destination_and_link_refused(model, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        lq.save(model, f)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        lq.save(model, f, overwrite=True)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        lq.save(model, f / "sub")
    assert f.read_bytes() == b"\x00" * 10
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        lq.save(model, tmp_path / "link", overwrite=True)
    assert _listing(target) == ["keep"]


def test_own_and_empty_folders_replaced(model, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    lq.save(model, out)  # empty folder: fine
    lq.save(model, out)  # our own model folder: replaced without overwrite
    assert _listing(tmp_path) == ["q"]
    assert lq.load(out) is not None


def test_swap_interrupted_between_renames_is_rolled_back(model, tmp_path):
    out = tmp_path / "q"
    lq.save(model, out)
    ref = json.loads((out / "quantization.json").read_text())
    pid = _dead_pid()
    # the state a kill between the two renames leaves: the old model renamed
    # aside, the complete new one not yet renamed into place
    os.replace(out, tmp_path / f".q.llmeq-old-{pid}-0a1b2c3d")
    lq.save(model, tmp_path / "other")
    os.replace(tmp_path / "other", tmp_path / f".q.llmeq-new-{pid}-0a1b2c3d")
    loaded = lq.load(out)  # load recovers first
    assert loaded is not None and json.loads((out / "quantization.json").read_text()) == ref
    assert _listing(tmp_path) == ["q"]


def test_stale_staging_folders_removed_by_next_save(model, tmp_path):
    out = tmp_path / "q"
    lq.save(model, out)
    pid = _dead_pid()
    (tmp_path / f".q.llmeq-new-{pid}-deadbeef").mkdir()
    (tmp_path / f".q.llmeq-new-{pid}-deadbeef" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".q.llmeq-old-{pid}-deadbeef").mkdir()  # q exists: this one is just garbage
    (tmp_path / ".q.tmp-abc123").mkdir()  # what versions before this one left
    (tmp_path / f".q.llmeq-new-{os.getpid()}-feedface").mkdir()  # a live writer's: left alone
    (tmp_path / ".other.tmp-zzz").mkdir()  # someone else's name: left alone
    lq.save(model, out)
    assert _listing(tmp_path) == [".other.tmp-zzz", f".q.llmeq-new-{os.getpid()}-feedface", "q"]


def test_sigkill_during_save_is_always_recoverable(model, tmp_path):
    """Kill a process that saves in a loop at several moments; after each
    kill the next load finds a complete model and the next save leaves no
    staging folder behind."""
    out = tmp_path / "q"
    lq.save(model, out)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        import tiny_models, llmeasyquant as lq
        m = tiny_models.build("llama"); lq.quantize(m, "absmax", progress=False)
        print("ready", flush=True)
        while True:
            lq.save(m, {str(out)!r})
    """)
    for delay in (0.0, 0.01, 0.03, 0.07, 0.15):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(delay)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert lq.load(out) is not None
        lq.save(model, out)
        assert _listing(tmp_path) == ["q"], f"leftovers after a kill {delay} s into the saves"


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llmeasyquant.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.parametrize("make_out", ["/", "file", "under_file", "foreign", "cwd"])
def test_cli_checks_destination_before_the_work(tmp_path, monkeypatch, make_out):
    import llmeasyquant.cli as cli
    import llmeasyquant.models as models

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(models, "load_model", no_work)
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "a_file"
    f.write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    out = {"/": "/", "file": str(f), "under_file": str(f / "q"), "foreign": str(tmp_path / "foreign"),
           "cwd": "."}[make_out]
    rc = cli.main(["quantize", "smollm2-135m", "--method", "absmax", "--out", out])
    assert rc == 2
    assert (tmp_path / "foreign" / "keep.txt").exists() and f.read_text() == "x"


def test_cli_error_is_one_line(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = _cli("quantize", "--method", "absmax", "--out", str(f / "q"), cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is a file, not a folder" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: an unwritable folder cannot be made here")
def test_cli_unwritable_destination(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = _cli("quantize", "--method", "absmax", "--out", str(ro / "q"), cwd=tmp_path)
        assert r.returncode == 2 and "not writable" in r.stderr
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("argv,msg", [
    (["eval", "x", "--max-windows", "-1"], "a window count, 0 for the whole file"),
    (["eval", "x", "--seq-len", "0"], "tokens per window"),
    (["compare", "--max-windows", "-3"], "a window count"),
])
def test_cli_number_arguments(argv, msg, capsys):
    import llmeasyquant.cli as cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_perplexity_arguments_checked():
    from llmeasyquant.eval.perplexity import perplexity

    ids = torch.arange(100)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        perplexity(None, ids=ids, seq_len=0)
    with pytest.raises(ValueError, match="max_windows must be None"):
        perplexity(None, ids=ids, seq_len=10, max_windows=-1)
