"""Locating the real text data (WikiText-2) shipped beside the project.

Found lazily, when a command first needs it (never at import: an unreadable
folder somewhere above the working directory must not break ``import
llmeasyquant``)."""

from __future__ import annotations

import os
from pathlib import Path


def _readable_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:  # e.g. PermissionError on a folder we may not enter
        return False


def data_dir() -> Path:
    """LLMEQ_DATA_DIR, else a shared/data beside the checkout we run from (the
    project's checkout sits next to shared/), searched upwards from the cwd."""
    env = os.environ.get("LLMEQ_DATA_DIR")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        cand = d.parent / "shared" / "data"
        if _readable_dir(cand / "wikitext-2"):
            return cand
    return here.parent / "shared" / "data"


def default_calib_file() -> str:
    """WikiText-2 validation (tokenized v1): the calibration text."""
    return str(data_dir() / "wikitext-2" / "wiki.valid.tokens")


def default_eval_file() -> str:
    """WikiText-2 raw test: the perplexity text."""
    return str(data_dir() / "wikitext-2" / "wiki.test.raw")


def __getattr__(name: str):
    # The old module constants, computed when read.
    if name == "DATA_DIR":
        return data_dir()
    if name == "DEFAULT_CALIB_FILE":
        return default_calib_file()
    if name == "DEFAULT_EVAL_FILE":
        return default_eval_file()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_text(path: str | os.PathLike, max_chars: int | None = None) -> str:
    """Read a text file, with a clear error naming where data is expected."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"text file not found: {p}. WikiText-2 is expected under {data_dir() / 'wikitext-2'} "
            "(set LLMEQ_DATA_DIR to the folder that holds wikitext-2/, or pass a path to any text file)")
    with open(p, encoding="utf-8") as f:
        return f.read() if max_chars is None else f.read(max_chars)
