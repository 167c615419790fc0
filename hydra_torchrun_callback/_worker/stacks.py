"""Stack dumps, the worker's side: before the task runs, faulthandler is told to dump
the stacks of all the worker's threads into a private file of its node when the worker
gets a stop signal (SIGTERM or SIGINT, chained: the signal then does what it did before)
and when it gets ``STACKS_SIGNAL`` (nothing else happens). faulthandler writes from the C
signal handler, so a rank blocked in native code (a gloo/NCCL wait) is dumped too, at once.
Every way a job stops reaches the workers as SIGTERM or SIGINT, so every still-running rank
leaves its stacks before it is killed. The node reads them (``_node.stack_service``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
from typing import IO, Optional

from hydra_torchrun_callback._wire.protocol import (
    DUMP_SIGNALS,
    STACKS_SIGNAL,
    dump_paths,
)

__all__ = [
    "arm_worker",
]

_armed: list[IO[bytes]] = []  # faulthandler keeps the files; so do we, for clarity


def arm_worker(folder: Optional[str], rank: int) -> None:
    """Have faulthandler dump this worker's stacks on a stop signal and on demand."""
    if not folder:
        return
    stop, demand = dump_paths(folder, rank, os.getpid())
    try:
        stop_file = open(stop, "ab", buffering=0)  # noqa: SIM115 (held for the process's life)
        demand_file = open(demand, "ab", buffering=0)  # noqa: SIM115
    except OSError:
        return  # never a reason for the task to fail
    _armed[:] = [stop_file, demand_file]
    for sig in DUMP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue  # the process ignores it: a dump would be noise
        faulthandler.register(sig, file=stop_file, all_threads=True, chain=True)
    faulthandler.register(STACKS_SIGNAL, file=demand_file, all_threads=True, chain=False)
    # A process the task forks (a DataLoader worker) would write into this rank's files.
    os.register_at_fork(after_in_child=_disarm)


def _disarm() -> None:
    for sig in (*DUMP_SIGNALS, STACKS_SIGNAL):
        with contextlib.suppress(Exception):
            faulthandler.unregister(sig)
