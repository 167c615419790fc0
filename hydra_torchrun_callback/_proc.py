"""Process-tree helpers read from /proc (Linux), shared by the agent and the sandbox."""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["alive", "descendants"]


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
