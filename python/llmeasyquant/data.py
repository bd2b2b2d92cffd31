"""Locating the real text data (WikiText-2) shipped beside the project."""

from __future__ import annotations

import os
from pathlib import Path



def _find_data_dir() -> Path:
    """LLMEQ_DATA_DIR, else a shared/data beside the checkout we run from (the
    project's checkout sits next to shared/), searched upwards from the cwd."""
    env = os.environ.get("LLMEQ_DATA_DIR")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        cand = d.parent / "shared" / "data"
        if (cand / "wikitext-2").is_dir():
            return cand
    return here.parent / "shared" / "data"


DATA_DIR = _find_data_dir()
DEFAULT_CALIB_FILE = str(DATA_DIR / "wikitext-2" / "wiki.valid.tokens")
DEFAULT_EVAL_FILE = str(DATA_DIR / "wikitext-2" / "wiki.test.raw")


def read_text(path: str | os.PathLike, max_chars: int | None = None) -> str:
    """Read a text file, with a clear error naming where data is expected."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"text file not found: {p}. WikiText-2 is expected under {DATA_DIR / 'wikitext-2'} "
            "(set LLMEQ_DATA_DIR to the folder that holds wikitext-2/, or pass a path to any text file)")
    with open(p, encoding="utf-8") as f:
        return f.read() if max_chars is None else f.read(max_chars)
