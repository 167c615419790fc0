"""submitit_local: the launching process sees a local job end as its processes exit.

Real submitit local jobs; the moment a job's controller process exits is observed with
``waitid(WNOWAIT)`` (which leaves the process for submitit to reap), so the latency
measured is exactly what the launching process adds after the job is over.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hydra_torchrun_callback._local_wait import POLL_S, prompt_local_waits, restore_local_waits

submitit = pytest.importorskip("submitit")


def _latency(executor: Any) -> float:
    """Seconds from the job's controller exiting to ``job.wait()`` returning."""
    job = executor.submit(time.time)
    exited: list[float] = []

    def watch() -> None:
        os.waitid(os.P_PID, job._process.pid, os.WEXITED | os.WNOWAIT)
        exited.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    job.wait()
    returned = time.monotonic()
    watcher.join(timeout=10)
    assert exited, "the controller never exited"
    assert isinstance(job.result(), float)  # the job itself ran and returned
    return returned - exited[0]


def test_local_jobs_are_seen_ending_promptly(tmp_path: Path) -> None:
    from submitit.core.core import Job
    from submitit.local.local import LocalJob

    executor = submitit.LocalExecutor(folder=tmp_path)
    executor.update_parameters(timeout_min=2)
    assert prompt_local_waits()
    try:
        assert prompt_local_waits()  # a second multirun in the process: still one undo
        # submitit's own wait sleeps 1 s between checks: uniform 0-1 s after the exit,
        # so three jobs all under 0.3 s would happen by chance 2.7 % of the time.
        latencies = [_latency(executor) for _ in range(3)]
        assert max(latencies) < 0.3, latencies
    finally:
        restore_local_waits()
    assert LocalJob.wait is Job.wait  # exactly submitit's again
    restore_local_waits()  # a second undo changes nothing
    assert LocalJob.wait is Job.wait
    assert POLL_S <= 0.05
