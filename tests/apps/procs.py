"""What a test app's worker knows about its processes."""

from __future__ import annotations

import os
from pathlib import Path


def agent_pid() -> int:
    """The pid of the torch elastic agent (the Hydra process) running this worker.

    With the warm start (forkserver) the worker's parent is the server the agent
    started, so look one level further up.
    """
    return above_warm_server(os.getppid())


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def above_warm_server(pid: int) -> int:
    """``pid``, or the Hydra process above it if ``pid`` is the warm server: a spawned
    one (multiprocessing's forkserver command line) or a fork of the Hydra process (the
    same command line as its parent: the app imported torch at the top)."""
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    up = parent(pid)
    if b"multiprocessing.forkserver" in cmd or cmd == Path(f"/proc/{up}/cmdline").read_bytes():
        return up
    return pid
