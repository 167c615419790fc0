"""Writing files into shared folders (the job's output dir) safely."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic", "write_text_atomic"]


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """:func:`write_atomic` of ``text``."""
    write_atomic(path, text.encode(), mode)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` in one step, as readers must see it whole.

    The temporary file gets an unpredictable name, created with O_EXCL and mode 0600
    (``mkstemp``) until ``mode`` is applied: in a folder others can write to, nobody can
    plant a symlink under that name to make us overwrite another file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
