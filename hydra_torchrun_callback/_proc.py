"""Process-tree helpers read from /proc (Linux), shared by the agent and the sandbox."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

__all__ = ["alive", "descendants", "die_with_parent", "parent_of"]


def _state_and_parent(stat: Path) -> tuple[str, int]:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) descendants of ``pid``, parents before their children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, parent = _state_and_parent(stat)
            if state != "Z":
                children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    """The ones among ``pids`` that still run (zombies count as gone)."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _state_and_parent(Path(f"/proc/{pid}/stat"))[0] != "Z":
                out.append(pid)
    return out


def parent_of(pid: int) -> Optional[int]:
    """The parent pid of ``pid``; None if it is gone."""
    try:
        return _state_and_parent(Path(f"/proc/{pid}/stat"))[1]
    except (OSError, ValueError, IndexError):
        return None


def die_with_parent(parent: int, signum: int = 9) -> bool:
    """Linux: have the kernel send ``signum`` (SIGKILL) to this process when ``parent``,
    its parent, dies (``PR_SET_PDEATHSIG``). Exits at once if ``parent`` died already
    (before prctl took effect). False where it cannot be set."""
    if not sys.platform.startswith("linux") or os.getppid() != parent:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if int(libc.prctl(1, signum)) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os._exit(1)
    return True
