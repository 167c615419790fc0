"""submitit_local: the launching process sees a local job end as its processes exit.

Real submitit local jobs. The moment a job's controller process exits is read from a
pidfd (readable once the process has exited, whoever reaps it), so the latency measured
is exactly what the launching process adds after the job is over.
"""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hydra_torchrun_callback._callback.local_wait import (
    POLL_S,
    prompt_local_waits,
    restore_local_waits,
)

submitit = pytest.importorskip("submitit")


def _latency(executor: Any, seconds: float) -> float:
    """Seconds from the job's controller exiting to ``job.wait()`` returning."""
    job = executor.submit(time.sleep, seconds)
    pidfd = os.pidfd_open(job._process.pid)
    exited: list[float] = []

    def watch() -> None:
        select.select([pidfd], [], [], 60)
        exited.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job.wait()
        returned = time.monotonic()
        watcher.join(timeout=10)
    finally:
        os.close(pidfd)
    assert exited, "the controller never exited"
    assert job.result() is None  # the job itself ran
    return returned - exited[0]


def test_local_jobs_are_seen_ending_promptly(tmp_path: Path) -> None:
    from submitit.core.core import Job
    from submitit.local.local import LocalJob

    executor = submitit.LocalExecutor(folder=tmp_path)
    executor.update_parameters(timeout_min=2)
    assert prompt_local_waits()
    try:
        assert prompt_local_waits()  # a second multirun under way in this process
        restore_local_waits()  # ... ends: the first one still has the prompt wait
        assert LocalJob.wait is not Job.wait
        # submitit's own wait checks at 0, 1, 2 s after the submission: jobs that run
        # 0, 1/5, ... 4/5 s longer than each other end at five points 0.2 s apart in that
        # second, so with it at least three would be seen 0.4 s or more after their end.
        # Four of five, not all: one scheduling stall of this process is not a fault.
        latencies = [_latency(executor, k / 5) for k in range(5)]
        assert sorted(latencies)[3] < 0.25, latencies
    finally:
        restore_local_waits()
    assert LocalJob.wait is Job.wait  # exactly submitit's again
    restore_local_waits()  # one undo too many changes nothing
    assert LocalJob.wait is Job.wait
    assert POLL_S <= 0.05
