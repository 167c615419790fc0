"""What a test app's worker knows about its processes."""

from __future__ import annotations

import os
from pathlib import Path


def agent_pid() -> int:
    """The pid of the torch elastic agent (the Hydra process) running this worker.

    With the warm start (forkserver) the worker's parent is the server the agent
    started, so look one level further up.
    """
    pid = os.getppid()
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"multiprocessing.forkserver" in cmd:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pid
