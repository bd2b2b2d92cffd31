"""Output folders that never destroy what they did not write.

Every command that writes a folder (``save``, ``quantize --out``, ``search
--out``) goes through here:

* :func:`check_destination` runs *before* any work: the destination must be a
  folder path (not ``""``, not a file, not a symlink), never the current
  directory, one of its parents or ``/``, under a writable folder; an existing
  non-empty folder is replaced only when it is one of our outputs (the caller's
  ``is_ours`` test: ``quantization.json`` for a model) or ``overwrite=True``.
* :func:`replace_atomically` writes into a hidden sibling
  ``.NAME.llmeq-new-PID-HEX`` and swaps it in with two renames (old folder to
  ``.NAME.llmeq-old-PID-HEX``, new folder to ``NAME``), then deletes the old.
* :func:`recover` (run by every save and load of ``NAME``) repairs what a kill
  left: an old folder without ``NAME`` beside it means the kill came between
  the two renames, so it is renamed back (roll back: the interrupted save never
  returned, the model before it is restored); any other leftover of a process
  that is no longer running is deleted. Folders of a running process are left
  alone (the PID in the name says whose they are).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

_NEW, _OLD = "llmeq-new", "llmeq-old"
# .NAME.llmeq-new-PID-HEX / .NAME.llmeq-old-PID-HEX
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>llmeq-new|llmeq-old)-(?P<pid>\d+)-[0-9a-f]+$")
# What llmeasyquant <= 0.1 left (mkdtemp names, no PID): .NAME.tmp-XXXX and .NAME.tmp-XXXX-old
_LEGACY = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]+(?P<old>-old)?$")


class DestinationError(ValueError):
    """The output path cannot be written without harming something; the
    message says what was expected and what was found."""


def _as_path(path, what: str) -> Path:
    if path is None or (isinstance(path, (str, bytes)) and not str(path).strip()):
        raise DestinationError(f"{what}: expected a folder path, got {path!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise DestinationError(f"{what}: expected a folder path (str or os.PathLike), got {type(path).__name__}")
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _is_empty_dir(p: Path) -> bool:
    with os.scandir(p) as it:
        return next(it, None) is None


def check_destination(path, *, overwrite: bool = False, is_ours: Optional[Callable[[Path], bool]] = None,
                      what: str = "save") -> Path:
    """The absolute destination folder, or :class:`DestinationError` saying why
    writing there would harm something. Creates nothing."""
    dest = _as_path(path, what)
    if dest.parent == dest:
        raise DestinationError(f"{what}: refusing to write a model over the filesystem root {dest}")
    cwd = Path.cwd().resolve()
    real = dest.resolve()
    if real == cwd or real in cwd.parents:
        raise DestinationError(f"{what}: refusing to replace {dest}: it is the current directory or one of its "
                               "parents; name a new folder inside it instead")
    if dest.is_symlink():
        raise DestinationError(f"{what}: {dest} is a symbolic link; name a real folder (a link is never followed "
                               "and replaced)")
    if dest.exists():
        if not dest.is_dir():
            raise DestinationError(f"{what}: {dest} exists and is a file, not a folder; choose another path")
        if not (os.access(dest, os.R_OK | os.X_OK) and os.access(dest.parent, os.W_OK | os.X_OK)):
            raise DestinationError(f"{what}: {dest} cannot be replaced (no permission on it or on {dest.parent})")
        if not _is_empty_dir(dest) and not (is_ours is not None and is_ours(dest)) and not overwrite:
            raise DestinationError(f"{what}: {dest} exists and is not an llmeasyquant output; refusing to replace "
                                   "its files (pass overwrite=True, or --overwrite on the command line, to replace "
                                   "it anyway)")
    else:
        _check_creatable(dest, what)
    return dest


def _check_creatable(dest: Path, what: str) -> None:
    """``dest`` does not exist: its nearest existing ancestor is a writable folder."""
    anc = dest.parent
    while not anc.exists():
        if anc.is_symlink():  # a dangling link
            raise DestinationError(f"{what}: {anc} is a broken symbolic link")
        anc = anc.parent
    if not anc.is_dir():
        raise DestinationError(f"{what}: cannot create {dest}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DestinationError(f"{what}: cannot create {dest}: {anc} is not writable")


def check_writable_folder(path, *, what: str) -> Path:
    """For outputs written file by file into a folder that may hold other
    files (``compare --out``: only its own compare.*/report.md/plots are
    rewritten): the folder is, or can be created as, a writable folder."""
    dest = _as_path(path, what)
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise DestinationError(f"{what}: {dest} exists and is not a folder")
        if not os.access(dest, os.W_OK | os.X_OK):
            raise DestinationError(f"{what}: {dest} is not writable")
        return dest
    _check_creatable(dest, what)
    return dest


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover(path) -> None:
    """Finish what a killed save of ``path`` left: roll back a half-done swap,
    delete stale staging folders. Safe to call at any time."""
    dest = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    parent = dest.parent
    if not parent.is_dir():
        return
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(f".{dest.name}.")]
    except OSError:
        return
    olds, stale = [], []
    for e in entries:
        m = _LEFTOVER.match(e.name)
        if m and m["name"] == dest.name:
            if _pid_running(int(m["pid"])):
                continue
            (olds if m["kind"] == _OLD else stale).append(Path(e.path))
            continue
        m = _LEGACY.match(e.name)
        if m and m["name"] == dest.name and e.is_dir(follow_symlinks=False):
            # no PID in these names: assumes no llmeasyquant <= 0.1 save of the same folder is running now
            (olds if m["old"] else stale).append(Path(e.path))
    if olds and not os.path.lexists(dest):
        back = max(olds, key=lambda p: p.stat().st_mtime)
        logger.warning("%s: a save was killed while swapping folders; restoring the previous model from %s",
                       dest, back.name)
        os.replace(back, dest)
        _fsync_dir(parent)
        olds.remove(back)
    for p in olds + stale:
        logger.info("removing the leftover of an interrupted save: %s", p)
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def replace_atomically(dest: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``dest``; when the block finishes,
    it becomes ``dest`` (any previous ``dest`` is removed only after the swap).
    An exception (or Ctrl-C) removes the staging folder and leaves ``dest`` as
    it was. Call :func:`check_destination` first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = dest.parent / f".{dest.name}.{_NEW}-{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if os.path.lexists(dest):
            old = dest.parent / f".{dest.name}.{_OLD}-{token}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
