"""What SLURM says of a sweep's jobs: which still live, how one ended; cancelling them.

Only SLURM's own clients (``squeue``, ``sacct``, ``scancel``), run with this process's
environment (``SLURM_CONF`` among it); never a network lookup of our own.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterable, Mapping
from typing import Optional

from hydra_torchrun_callback._result import TorchrunSetupError

__all__ = ["LIVE_STATES", "ended_as", "job_states", "live_jobs", "scancel"]

#: squeue states of a job that may still run (or is still shutting down).
LIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
_TIMEOUT_S = 60


def _run(cmd: list[str], env: Optional[Mapping[str, str]]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )


def job_states(job_ids: Iterable[str], env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """squeue's state of each job it still lists (array tasks one by one, ``12_3``).

    Raises :class:`TorchrunSetupError` when squeue cannot answer: resuming on a guess
    could submit a running point a second time."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    try:
        out = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i %T"], env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TorchrunSetupError(
            f"cannot ask SLURM which of the sweep's jobs still run (squeue: {exc}). Fix: run "
            "this where squeue works (with SLURM_CONF set if your site needs it)."
        ) from exc
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise TorchrunSetupError(
            f"cannot ask SLURM which of the sweep's jobs still run (squeue exited "
            f"{out.returncode}: {out.stderr.strip()[:500]}). Fix: run this where squeue works."
        )
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def live_jobs(job_ids: Iterable[str], env: Optional[Mapping[str, str]] = None) -> set[str]:
    """The jobs among ``job_ids`` that are queued, running or still shutting down."""
    wanted = {str(j) for j in job_ids if j}
    states = job_states(wanted, env)
    return {j for j in wanted if states.get(j) in LIVE_STATES}


def ended_as(job_id: str, env: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
    """(state, exit code) as sacct has them, or ("", "") when sacct cannot say."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"], env)
        for line in out.stdout.splitlines():
            state, _, code = line.partition("|")
            if state:
                return state.strip(), code.strip()
    return "", ""


def scancel(job_ids: Iterable[str], env: Optional[Mapping[str, str]] = None) -> str:
    """Cancel these jobs; scancel's complaints, if any."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return ""
    try:
        out = _run(["scancel", *ids], env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return out.stderr.strip()
