"""When a process was created, in epoch seconds, so every process's timestamps line up.

/proc/<pid>/stat field 22 (starttime) counts clock ticks (1/CLK_TCK = 10 ms) since boot.
Boot time comes from CLOCK_BOOTTIME rather than /proc/stat's ``btime``: btime is whole
seconds, which would shift every creation time by up to 1 s; the tick is the only error left.
"""

from __future__ import annotations

import os
import time

__all__ = ["TICK", "process_start"]

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def process_start(pid: int | str = "self") -> float:
    """Epoch seconds at which ``pid`` was created (fork time; exec keeps it)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks * TICK
    return time.time() - since_boot
