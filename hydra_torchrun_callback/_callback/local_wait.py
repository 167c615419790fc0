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

Only that class attribute is replaced, and only while it is submitit's inherited
``Job.wait``; :func:`restore_local_waits` (at the multirun's end) removes it again, so
nothing else of submitit changes. A multirun whose job fails ends without Hydra's
``on_multirun_end``: the prompt wait then stays for the rest of that (ending) process.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["POLL_S", "prompt_local_waits", "restore_local_waits"]

#: Seconds between two checks of a local job (a waitpid each: about 10 us of CPU).
POLL_S = 0.02

#: Multiruns in this process under way with ours in place (one Hydra app may run several).
_depth: list[int] = [0]


def _wait_promptly(job: Any) -> None:
    while not job.done():
        time.sleep(POLL_S)


def prompt_local_waits() -> bool:
    """Make submitit's local jobs wait with :data:`POLL_S` (until as many
    :func:`restore_local_waits`). False, changing nothing, when submitit's local job
    class is not there or has a ``wait`` of its own (a submitit we do not know)."""
    try:
        from submitit.core.core import Job
        from submitit.local.local import LocalJob
    except ImportError:
        return False
    if LocalJob.wait is not Job.wait and LocalJob.__dict__.get("wait") is not _wait_promptly:
        return False
    LocalJob.wait = _wait_promptly  # type: ignore[method-assign,assignment]
    _depth[0] += 1
    return True


def restore_local_waits() -> None:
    """Undo one :func:`prompt_local_waits`; the last one puts submitit's wait back."""
    if _depth[0] == 0:
        return
    _depth[0] -= 1
    if _depth[0] == 0:
        from submitit.local.local import LocalJob

        if LocalJob.__dict__.get("wait") is _wait_promptly:
            del LocalJob.wait  # inherited from submitit's Job again
