"""Atomic file writes: a temporary file in the same directory, renamed into place, so a reader
never sees half a file and an interrupted write leaves the old one intact."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty directory beside ``path`` (same file system: it can be renamed into place).
    Raises OSError naming ``path`` (not the temporary name) when its directory is not writable."""
    path = Path(path)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
