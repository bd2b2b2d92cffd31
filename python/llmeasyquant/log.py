"""The package logger. Library code logs what it decided and how long it took
at INFO (silent by default); ``llmeasyquant -v ...`` or
``llmeasyquant.log.configure(verbose=True)`` shows it on stderr."""

from __future__ import annotations

import logging

logger = logging.getLogger("llmeasyquant")


def configure(verbose: bool = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logger.setLevel(level)
    if not any(getattr(h, "_llmeq", False) for h in logger.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("llmeasyquant: %(message)s"))
        h._llmeq = True
        logger.addHandler(h)
