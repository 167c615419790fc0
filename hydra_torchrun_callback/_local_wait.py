"""submitit_local: the launching process sees a job end when its nodes exit, not up to
a second later.

Hydra's submitit launcher waits for each job with submitit's ``Job.wait``, which
checks ``done()`` and then sleeps a whole second. For a SLURM job a check reads the
shared filesystem (and, now and then, sacct), so a second is a fair pace. For a local
job (emulated nodes) a check is a ``waitpid(WNOHANG)`` on the job's controller
process: nothing is read, nothing is asked of a scheduler. So while a multirun with
submitit_local runs, the launching process checks local jobs every
:data:`POLL_S` instead; the sleep was costing 0.5 s per job on average (measured in
``benchmarks/RESULTS.md``, "top process exits"). SLURM jobs keep submitit's own wait.

Only that class attribute is replaced, and :func:`restore_local_waits` (at the
multirun's end) puts back exactly what was there; nothing else of submitit changes.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["POLL_S", "prompt_local_waits", "restore_local_waits"]

#: Seconds between two checks of a local job (a waitpid each: about 10 us of CPU).
POLL_S = 0.02

_MISSING = object()
#: What LocalJob had as its own ``wait`` before (set while ours is in place).
_previous: list[Any] = []


def _wait_promptly(job: Any) -> None:
    while not job.done():
        time.sleep(POLL_S)


def prompt_local_waits() -> bool:
    """Make submitit's local jobs wait with :data:`POLL_S` (until
    :func:`restore_local_waits`). False when submitit's local job class is not there."""
    try:
        from submitit.local.local import LocalJob
    except ImportError:
        return False
    if not callable(getattr(LocalJob, "done", None)):
        return False
    if not _previous:  # a second multirun in this process keeps the first one's undo
        _previous.append(LocalJob.__dict__.get("wait", _MISSING))
        LocalJob.wait = _wait_promptly  # type: ignore[method-assign,assignment]
    return True


def restore_local_waits() -> None:
    """Put back exactly what LocalJob had."""
    if not _previous:
        return
    from submitit.local.local import LocalJob

    previous = _previous.pop()
    if previous is _MISSING:
        if LocalJob.__dict__.get("wait") is _wait_promptly:
            del LocalJob.wait
    else:
        LocalJob.wait = previous  # type: ignore[method-assign]
