"""Reading faulthandler's dumps: the frames of each thread, where a rank is (its
innermost frame of user code), ranks grouped by that frame; rank lists as people read
them (``0-3,7``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "Frame",
    "group_by_frame",
    "main_thread_frames",
    "parse_dumps",
    "rank_label",
    "rank_ranges",
    "where",
]


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    def short(self) -> str:
        return f"{self.function} ({os.path.basename(self.file)}:{self.line})"

    def as_dict(self) -> dict[str, Any]:
        return {"function": self.function, "file": self.file, "line": self.line}


_THREAD = re.compile(r"(Current thread|Thread) (0x[0-9a-fA-F]+) \(most recent call first\):")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')

#: One dump: thread ident -> its frames, innermost first.
Dump = dict[int, list[Frame]]


def parse_dumps(text: str) -> list[Dump]:
    """faulthandler's output, possibly several dumps appended, as a list of dumps.

    faulthandler writes no separator; each thread appears once per dump, so a thread
    seen again starts the next dump. A dump cut short by a second signal can end in the
    middle of a line (faulthandler writes a line in many small writes): a thread header
    found after other text on a line also starts the next dump."""
    dumps: list[Dump] = []
    current: Optional[list[Frame]] = None
    for line in text.splitlines():
        head = _THREAD.search(line)
        if head:
            ident = int(head.group(2), 16)
            if not dumps or ident in dumps[-1] or line[: head.start()].strip():
                dumps.append({})
            current = dumps[-1][ident] = []
            continue
        frame = _FRAME.match(line)
        if frame and current is not None:
            current.append(Frame(frame.group(1), int(frame.group(2)), frame.group(3)))
    return dumps


def _is_library(path: str) -> bool:
    return (
        "site-packages" in path
        or "dist-packages" in path
        or path.startswith("<")
        or re.search(r"/lib/python3\.\d+/", path) is not None
        or "hydra_torchrun_callback" in path
    )


def where(frames: Sequence[Frame]) -> str:
    """ "all_reduce (distributed_c10d.py:2806) <- main (train.py:42)": the innermost frame
    and, if that is library code, the innermost frame of the user's own code."""
    if not frames:
        return "<no Python frame>"
    text = frames[0].short()
    if _is_library(frames[0].file):
        own = next((f for f in frames if not _is_library(f.file)), None)
        if own is not None:
            text += f" <- {own.short()}"
    return text


def main_thread_frames(dumps: Sequence[Dump], main_ident: Optional[int]) -> Optional[list[Frame]]:
    """The main thread's frames in the first dump that has them.

    A stop dump can be cut short: faulthandler chains with SA_NODEFER, so a second
    SIGTERM (SLURM signals every process of a step and the agent signals its workers
    too) starts a new dump inside the first and then ends the process. faulthandler
    writes the newest thread first and the main thread last, so the cut dump usually
    lacks it; the next dump has it. Without a known ident, the last thread of the first
    dump is the main thread (the oldest). None: no dump reached the main thread (the
    process was killed while writing); another thread's frames would mislead."""
    if main_ident is not None:
        found = [dump[main_ident] for dump in dumps if main_ident in dump]
        # A dump cut right after the main thread's header has it without frames.
        return next((frames for frames in found if frames), found[0] if found else None)
    return next((list(dump.values())[-1] for dump in dumps if dump), None)


def group_by_frame(wheres: Mapping[int, str]) -> list[tuple[list[int], str]]:
    """Ranks with the same place collapsed: [([0, 1, 3], "all_reduce ..."), ([2], ...)]."""
    groups: dict[str, list[int]] = {}
    for rank in sorted(wheres):
        groups.setdefault(wheres[rank], []).append(rank)
    return sorted(((ranks, text) for text, ranks in groups.items()), key=lambda g: g[0][0])


def rank_label(ranks: Sequence[int]) -> str:
    """ "rank 3" or "ranks 0-2,5"."""
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {rank_ranges(ranks)}"


def rank_ranges(ranks: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    ordered = sorted(set(ranks))
    parts: list[str] = []
    start = prev = None
    for rank in [*ordered, None]:
        if rank is not None and prev is not None and rank == prev + 1:
            prev = rank
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = rank
    return ",".join(parts) or "none"
