"""A sweep point's own record, kept by its job (in the point's Hydra process, node 0).

Every multirun job run with the callback records, in its own output dir, each attempt's
state (running, then completed or failed, with the root cause) and rank 0's value, signed:
what ``resume=true`` and ``hydra-torchrun-summary`` read, with no option needed. Also the
job's run identity (``HYDRA_TORCHRUN_RUN_ID``), stable across requeues and resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._wire import sweep_files

__all__ = ["PointJob", "finish_point", "point_job", "run_identity", "sweep_id"]

#: Root causes are kept whole up to this many characters in the record.
CAUSE_CHARS = 8000


def _multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")


def _sweep_dir(config: DictConfig) -> Optional[str]:
    """The sweep dir, absolute (with ``hydra.job.chdir`` the job runs in its own dir)."""
    value = OmegaConf.select(config, "hydra.sweep.dir", default=None)
    if not value:
        return None
    cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None) or os.getcwd()
    return os.path.join(str(cwd), str(value))


@dataclass(frozen=True)
class PointJob:
    """This job as a point of its sweep."""

    job_dir: str
    sweep_id: str
    num: int
    overrides: tuple[str, ...]
    attempt_id: str

    @property
    def key(self) -> str:
        return sweep_files.point_key(self.sweep_id, self.num, self.overrides)

    def base(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id, "num": self.num, "overrides": list(self.overrides)}


def sweep_id(config: DictConfig) -> Optional[str]:
    """The id of the sweep this job is a point of (its sweep dir's ``sweep.json``); None
    outside a sweep the callback started, or when the sweep dir cannot be read from here
    (node-local dirs)."""
    sweep_dir = _sweep_dir(config)
    if not _multirun(config) or sweep_dir is None:
        return None
    info = sweep_files.read_sweep(sweep_dir)
    return str(info["id"]) if info is not None and info.get("id") else None


def point_job(
    config: DictConfig, env: Mapping[str, str], sweep: Optional[str]
) -> Optional[PointJob]:
    """This job as point of the sweep ``sweep`` (:func:`sweep_id`), recorded as running;
    None outside a sweep."""
    if sweep is None:
        return None
    job_dir = str(OmegaConf.select(config, "hydra.runtime.output_dir"))
    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or []
    assert isinstance(overrides, list)
    point = PointJob(
        job_dir=job_dir,
        sweep_id=sweep,
        num=int(config.hydra.job.num),
        overrides=tuple(str(o) for o in overrides),
        attempt_id=f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}",
    )
    try:
        sweep_files.record_attempt(
            job_dir,
            point.base(),
            attempt_id=point.attempt_id,
            state="running",
            started=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
            slurm_job=_slurm_job(env),
        )
    except OSError as exc:
        log.warning("could not record this point's state in %s: %s", job_dir, exc)
        return None
    return point


def _slurm_job(env: Mapping[str, str]) -> Optional[str]:
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def finish_point(point: PointJob, job_return: Any) -> None:
    """Record how the attempt ended; a completed one leaves rank 0's value, signed."""
    from hydra.core.utils import JobStatus

    ended = time.time()
    completed = getattr(job_return, "status", None) == JobStatus.COMPLETED
    fields: dict[str, Any] = {"ended": ended}
    if completed:
        fields["state"] = "completed"
        fields["value_saved"] = _save_value(point, job_return.return_value)
    else:
        exc = getattr(job_return, "_return_value", None)
        fields["state"] = "failed"
        fields["error_type"] = type(exc).__name__ if exc is not None else None
        fields["cause"] = str(exc)[:CAUSE_CHARS] if exc is not None else "unknown"
    try:
        sweep_files.record_attempt(
            point.job_dir, point.base(), attempt_id=point.attempt_id, **fields
        )
    except OSError as exc:
        log.warning("could not record this point's end in %s: %s", point.job_dir, exc)


def _save_value(point: PointJob, value: Any) -> bool:
    from hydra_torchrun_callback._wire import pickling

    try:
        data = pickling.dumps(value)
        sweep_files.seal_value(point.job_dir, point.key, data)
    except Exception as exc:  # unpicklable, unwritable, no key file: resume re-runs it
        log.warning(
            "rank 0's value of this point could not be saved for resume (%s: %s): "
            "resume=true runs this point again",
            type(exc).__name__,
            exc,
        )
        return False
    return True


def run_identity(config: DictConfig, env: Mapping[str, str], sweep: Optional[str]) -> str:
    """A run id the task's loggers can continue: the same after a requeue or a resume.

    A sweep point: its sweep's id and job number (its dir, which resume keeps). A single
    run under SLURM: its job id (a requeued job keeps it; ``${now:}`` in the run dir does
    not survive a requeue). Elsewhere: its output dir. 20 hex digits (W&B takes them)."""
    if sweep is not None:
        basis = f"sweep\0{sweep}\0{config.hydra.job.num}"
        return hashlib.sha256(basis.encode()).hexdigest()[:20]
    job = _slurm_job(env)
    if job and not _multirun(config):
        basis = f"slurm\0{env.get('SLURM_CLUSTER_NAME', '')}\0{job}"
    else:
        out = str(OmegaConf.select(config, "hydra.runtime.output_dir", default="") or "")
        with contextlib.suppress(OSError):
            out = os.path.realpath(out)
        basis = f"dir\0{out}"
    return hashlib.sha256(basis.encode()).hexdigest()[:20]
